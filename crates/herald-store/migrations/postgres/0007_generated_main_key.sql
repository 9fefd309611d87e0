-- The main key a cluster generated for its secrets at rest because none was configured
-- (main_key, HERALD_MAIN_KEY): one row, written by the first node to start, read by every
-- other. It sits beside the secrets it encrypts, so it protects them from nothing that can
-- read the database; nodes log so at every start. A configured key replaces it (the row
-- then only decrypts what was written under it, until `herald rotate-main-key`).
CREATE TABLE generated_main_key (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    main_key TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
