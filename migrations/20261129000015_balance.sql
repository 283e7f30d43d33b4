-- The provider's balance, when known: the provider's API does not report it, so an
-- operator states it (the tasks the account can still pay for, from the contract or the
-- provider's console) with report_set_balance, and every create then takes one from it
-- first, shared by every process. New rows stop creating once only `headroom` is left
-- (kept for retries of rows already paid for); at 0 creating stops for the account
-- (67200005) until the next report_set_balance. No row here: the balance is not tracked.
-- Safe to run twice by hand.
CREATE TABLE IF NOT EXISTS report_account_balance (
    account   text        PRIMARY KEY,
    remaining bigint      NOT NULL CONSTRAINT report_account_balance_remaining_negative CHECK (remaining >= 0),
    headroom  bigint      NOT NULL CONSTRAINT report_account_balance_headroom_negative CHECK (headroom >= 0),
    set_at    timestamptz NOT NULL DEFAULT now(),
    set_by    text
);
ALTER TABLE report_account_balance SET (fillfactor = 50);

-- States the account's balance (tasks it can still pay for) and the part kept for
-- retries (default 5 %). Lifts a stop that the known balance caused, and brings forward
-- the rows that were waiting for a top-up. Writes an account event naming the actor.
CREATE OR REPLACE FUNCTION report_set_balance(p_account text, p_tasks bigint, p_headroom bigint DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_headroom bigint := coalesce(p_headroom, p_tasks / 20);
    v_actor    text := coalesce(nullif(current_setting('report_worker.actor', true), ''), session_user);
BEGIN
    IF p_tasks IS NULL OR p_tasks < 0 THEN
        RAISE EXCEPTION 'report_set_balance: the balance must be 0 or more, got %', p_tasks
            USING ERRCODE = 'check_violation';
    END IF;
    IF v_headroom < 0 THEN
        RAISE EXCEPTION 'report_set_balance: the headroom must be 0 or more, got %', v_headroom
            USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO report_account_balance AS b (account, remaining, headroom, set_at, set_by)
    VALUES (p_account, p_tasks, v_headroom, now(), v_actor)
    ON CONFLICT (account) DO UPDATE
       SET remaining = EXCLUDED.remaining, headroom = EXCLUDED.headroom,
           set_at = now(), set_by = EXCLUDED.set_by;
    IF p_tasks > 0 THEN
        DELETE FROM report_account_stops
         WHERE account = p_account AND error_code = 67200005 AND reason LIKE 'known balance%';
        UPDATE report_requests SET run_after = now(), updated_at = now()
         WHERE state = 'queued' AND run_after > now()
           AND last_error LIKE 'waiting for a top-up of account ' || p_account || '%';
    END IF;
    INSERT INTO report_events (request_id, account, state, attempts, error, actor, action)
    VALUES (NULL, p_account, 'balance', 0,
            format('balance set to %s tasks (%s kept for retries)', p_tasks, v_headroom),
            v_actor, 'set_balance');
END $$;
REVOKE EXECUTE ON FUNCTION report_set_balance(text, bigint, bigint) FROM PUBLIC;
