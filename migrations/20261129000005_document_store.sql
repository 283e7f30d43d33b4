-- Documents in object storage: report_documents keeps every document's metadata (size,
-- sha256, content type, file name); the bytes are either in `content` (the PostgreSQL
-- store, the default) or in an S3-compatible bucket under `object_key`, never both and
-- never neither. Safe to run twice by hand.

ALTER TABLE report_documents ADD COLUMN IF NOT EXISTS object_key text;
ALTER TABLE report_documents ALTER COLUMN content DROP NOT NULL;

-- The size check applies to bytes held here; NOT VALID: rows stored before all hold
-- their content and passed the stricter check already.
ALTER TABLE report_documents DROP CONSTRAINT IF EXISTS report_documents_byte_size_mismatch;
ALTER TABLE report_documents ADD CONSTRAINT report_documents_byte_size_mismatch
    CHECK (content IS NULL OR byte_size = octet_length(content)) NOT VALID;

ALTER TABLE report_documents DROP CONSTRAINT IF EXISTS report_documents_content_or_object;
ALTER TABLE report_documents ADD CONSTRAINT report_documents_content_or_object
    CHECK ((content IS NULL) <> (object_key IS NULL)) NOT VALID;

ALTER TABLE report_documents DROP CONSTRAINT IF EXISTS report_documents_object_key_invalid;
ALTER TABLE report_documents ADD CONSTRAINT report_documents_object_key_invalid
    CHECK (object_key IS NULL OR (object_key <> '' AND char_length(object_key) <= 1024
                                  AND object_key !~ '[[:cntrl:]]' AND object_key !~ '(^|/)\.\.?(/|$)'))
    NOT VALID;
