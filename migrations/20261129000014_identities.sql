-- Identity across name, credit code and organization code, learned from the provider's
-- own answers: a downloaded report's file name carries the company name the provider
-- resolved the request to (`<company>_企业创新能力报告.pdf`). Every stored download of a
-- request that named the company one way only (a name, or a credit code, or an
-- organization code) adds an observation "this identifier is this company". Reuse
-- across identifiers is allowed only between identifiers whose company is *confirmed*
-- (see report_identity_company). Safe to run twice by hand.

-- The company in a provider's file name: the name without its extension, up to its one
-- '_' ('小米科技有限责任公司_企业创新能力报告.pdf' → '小米科技有限责任公司'). With more than
-- one '_' it is not known which ends the company (a character the stored name's
-- sanitiser replaced, or another naming): NULL, nothing is learned.
CREATE OR REPLACE FUNCTION report_company_in_file_name(p_file_name text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN cardinality(string_to_array(stem, '_')) <= 2
                THEN nullif(btrim(split_part(stem, '_', 1)), '') END
      FROM (SELECT regexp_replace(p_file_name, '\.[A-Za-z0-9]{1,5}$', '') AS stem) f
$$;

CREATE TABLE IF NOT EXISTS report_identities (
    kind         text        NOT NULL CONSTRAINT report_identities_kind_unknown
                             CHECK (kind IN ('company_name', 'credit_code', 'org_number')),
    value        text        NOT NULL,
    -- The company the provider's file name gave for a request by this identifier alone.
    company_name text        NOT NULL,
    observations integer     NOT NULL DEFAULT 1,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    -- The request whose document was the last observation.
    last_request bigint      NOT NULL,
    PRIMARY KEY (kind, value, company_name)
);
CREATE INDEX IF NOT EXISTS report_identities_company_idx ON report_identities (company_name);

-- The company an identifier certainly is, by the provider's own answers, or NULL. All
-- of these must hold, so that nothing is merged on a guess:
-- - every observation of the identifier gave the same company (no conflict);
-- - a request by that company's name came back under exactly that name, and never
--   another (the file-name rule holds for this company: the name read out of the file
--   name is the name the provider uses, not a fragment of something else).
CREATE OR REPLACE FUNCTION report_identity_company(p_kind text, p_value text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT i.company_name
      FROM report_identities i
     WHERE i.kind = p_kind AND i.value = p_value
       AND NOT EXISTS (SELECT 1 FROM report_identities o
                        WHERE o.kind = p_kind AND o.value = p_value
                          AND o.company_name <> i.company_name)
       AND EXISTS (SELECT 1 FROM report_identities n
                    WHERE n.kind = 'company_name' AND n.value = i.company_name
                      AND n.company_name = i.company_name)
       AND NOT EXISTS (SELECT 1 FROM report_identities n
                        WHERE n.kind = 'company_name' AND n.value = i.company_name
                          AND n.company_name <> i.company_name)
$$;

-- Every learned link and how sure it is: 'confirmed' (used for reuse), 'unconfirmed'
-- (the company's own name has not come back under that name yet), 'conflicting' (the
-- identifier came back under several companies: never used).
CREATE OR REPLACE VIEW report_identity_links AS
SELECT i.kind, i.value, i.company_name, i.observations, i.first_seen, i.last_seen,
       i.last_request,
       CASE WHEN EXISTS (SELECT 1 FROM report_identities o
                          WHERE o.kind = i.kind AND o.value = i.value
                            AND o.company_name <> i.company_name) THEN 'conflicting'
            WHEN report_identity_company(i.kind, i.value) IS NOT NULL THEN 'confirmed'
            ELSE 'unconfirmed' END AS confidence
  FROM report_identities i;

-- Learning: with each statement that stores downloaded documents (not reuse copies),
-- from the requests that named the company one way only (with several identifiers,
-- which one the provider went by is undocumented: nothing is learned). One upsert per
-- statement (the worker stores documents in batches), in key order so that concurrent
-- batches never wait on each other in a cycle.
CREATE OR REPLACE FUNCTION report_documents_learn_identity() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('report_worker.action', true), '') = 'reuse' THEN
        RETURN NULL;
    END IF;
    INSERT INTO report_identities AS r (kind, value, company_name, observations, last_request)
    SELECT kind, value, company, count(*), max(request_id)
      FROM (SELECT CASE WHEN nullif(q.company_name, '') IS NOT NULL THEN 'company_name'
                        WHEN nullif(q.credit_code, '') IS NOT NULL THEN 'credit_code'
                        ELSE 'org_number' END AS kind,
                   coalesce(nullif(q.company_name, ''), nullif(q.credit_code, ''), nullif(q.org_number, '')) AS value,
                   report_company_in_file_name(n.file_name) AS company, n.request_id
              FROM new_documents n JOIN report_requests q ON q.id = n.request_id
             WHERE num_nonnulls(nullif(q.company_name, ''), nullif(q.credit_code, ''), nullif(q.org_number, '')) = 1) s
     WHERE company IS NOT NULL
     GROUP BY kind, value, company
     ORDER BY kind, value, company
    ON CONFLICT (kind, value, company_name) DO UPDATE
       SET observations = r.observations + EXCLUDED.observations, last_seen = now(),
           last_request = EXCLUDED.last_request;
    RETURN NULL;
END $$;

-- What is already stored teaches the same. Before the trigger exists: creating it locks
-- report_documents against inserts until this migration commits, so it comes last (a
-- document stored while this runs may go unlearned, which only means one observation
-- fewer). 1,000,000 documents: 11.5 s (BENCHMARKS.md).
INSERT INTO report_identities AS r (kind, value, company_name, observations, first_seen, last_seen, last_request)
SELECT kind, value, company, count(*), min(created_at), max(created_at), max(request_id)
  FROM (SELECT CASE WHEN nullif(q.company_name, '') IS NOT NULL THEN 'company_name'
                    WHEN nullif(q.credit_code, '') IS NOT NULL THEN 'credit_code'
                    ELSE 'org_number' END AS kind,
               coalesce(nullif(q.company_name, ''), nullif(q.credit_code, ''), nullif(q.org_number, '')) AS value,
               report_company_in_file_name(d.file_name) AS company, d.created_at, d.request_id
          FROM report_documents d JOIN report_requests q ON q.id = d.request_id
         WHERE num_nonnulls(nullif(q.company_name, ''), nullif(q.credit_code, ''), nullif(q.org_number, '')) = 1
           AND NOT EXISTS (SELECT 1 FROM report_events e
                            WHERE e.request_id = d.request_id AND e.action = 'reuse')) AS s
 WHERE company IS NOT NULL
 GROUP BY kind, value, company
ON CONFLICT (kind, value, company_name) DO NOTHING;

DROP TRIGGER IF EXISTS report_documents_learn_identity ON report_documents;
CREATE TRIGGER report_documents_learn_identity
    AFTER INSERT ON report_documents
    REFERENCING NEW TABLE AS new_documents
    FOR EACH STATEMENT EXECUTE FUNCTION report_documents_learn_identity();
