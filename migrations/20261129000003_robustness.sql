-- Robustness at the edges. Safe to run twice by hand.

-- Downloads of the current task that were not a valid report (an HTML page, a ZIP that
-- is not a DOCX…): after a few, the task is given up (a new one is an attempt) instead
-- of being downloaded forever.
ALTER TABLE report_requests
    ADD COLUMN IF NOT EXISTS bad_downloads int NOT NULL DEFAULT 0;

-- Which row and which answer caused an account stop.
ALTER TABLE report_account_stops
    ADD COLUMN IF NOT EXISTS request_id bigint,
    ADD COLUMN IF NOT EXISTS endpoint   text,
    ADD COLUMN IF NOT EXISTS answer     text;

-- Document file names: the characters refused no longer depend on the database's locale.
-- `[[:cntrl:]]` matches only Cc under C.UTF-8 but also format characters (bidi marks,
-- zero-width joiners, soft hyphens…) and U+2028/U+2029 under ICU and glibc locales, so a
-- name the worker's sanitiser kept could be refused on one server and not another. The
-- class below is the union: Cc, Cf, Zl and Zp (Unicode 15), the same table the sanitiser
-- uses (src/upstream/document.rs); a test checks both agree on every code point.
-- NOT VALID: rows stored before keep their names; new rows are checked.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'report_documents_file_name_unsafe') THEN
        ALTER TABLE report_documents ADD CONSTRAINT report_documents_file_name_unsafe CHECK (
            file_name !~ '[\u0001-\u001f\u007f-\u009f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]'
        ) NOT VALID;
    END IF;
END $$;
