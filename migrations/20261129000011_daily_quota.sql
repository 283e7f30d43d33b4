-- Quota awareness: creates started per account and day (Asia/Shanghai, as the provider
-- counts), reserved before each create when UPSTREAM_DAILY_LIMIT is set, so every
-- process shares one count. Safe to run twice by hand.
CREATE TABLE IF NOT EXISTS report_daily_creates (
    account text   NOT NULL,
    day     date   NOT NULL,
    used    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account, day)
);
