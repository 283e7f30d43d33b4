-- Table care, from measurement (BENCHMARKS.md, "HOT updates"): a row of report_requests is
-- updated about nine times in its life (claim, intent, task, heartbeats, snoozes, result);
-- with full pages (the default fillfactor 100) only 30 % of those updates were HOT. At
-- fillfactor 80 they were 41 %, the table 25 % smaller and burn-down 7 % faster. The
-- small tables updated on every call or state change get room for HOT updates too, and
-- report_requests is vacuumed and analysed long before a fifth of a large table is dead.
-- New pages only: existing ones fill as before until rewritten. Safe to run twice.
ALTER TABLE report_requests SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.05
);
ALTER TABLE report_state_counts SET (fillfactor = 50);
ALTER TABLE report_account_pacing SET (fillfactor = 50);
ALTER TABLE report_account_stops SET (fillfactor = 50);
