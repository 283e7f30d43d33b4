-- Reuse: a row may be served from a document already stored for the same identifier
-- and report type, younger than `reuse_within` (the row's own value, else the
-- deployment's REPORT_REUSE_WITHIN; '0' never reuses). Safe to run twice by hand.
ALTER TABLE report_requests ADD COLUMN IF NOT EXISTS reuse_within interval;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_requests_reuse_within_negative') THEN
        ALTER TABLE report_requests ADD CONSTRAINT report_requests_reuse_within_negative
            CHECK (reuse_within >= interval '0');
    END IF;
END $$;
