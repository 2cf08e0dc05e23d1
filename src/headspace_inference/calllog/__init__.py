"""The call log: every call's row, journalled to disk before the database, written in
batches with its usage rollup; the service's own tables and their migrations."""
