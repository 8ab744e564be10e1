-- Destination database: the roles of the pipeline, each granted only what it needs.
-- Idempotent: run it again after init.sql in every database the pipeline uses (roles
-- belong to the server, grants to the database), as a superuser:
--
--   psql -v ON_ERROR_STOP=1 -v consumer_password=... -v reader_password=... -f roles.sql
--
-- The passwords: psql -v consumer_password=..., or the environment's CDC_CONSUMER_PASSWORD,
-- or the file CDC_CONSUMER_PASSWORD_FILE names (and the same for the reader); see
-- role_passwords.psql. Without any, a role's password is left as it is (a new role then
-- has none and cannot log in over TCP until one is set).
\ir ../role_passwords.psql

SELECT 'CREATE ROLE cdc_consumer LOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_consumer') \gexec
SELECT 'CREATE ROLE cdc_reader LOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_reader') \gexec

\if :{?consumer_password}
ALTER ROLE cdc_consumer PASSWORD :'consumer_password';
\endif
\if :{?reader_password}
ALTER ROLE cdc_reader PASSWORD :'reader_password';
\endif

SELECT format('GRANT CONNECT ON DATABASE %I TO cdc_consumer, cdc_reader', current_database()) \gexec
GRANT USAGE ON SCHEMA public TO cdc_consumer, cdc_reader;

-- The consumer upserts and deletes employees and keeps its bookkeeping beside them,
-- cdc_applied and cdc_truncated (ON CONFLICT ... WHERE and RETURNING read the rows,
-- hence SELECT). Nothing else.
GRANT SELECT, INSERT, UPDATE, DELETE ON employees, cdc_applied, cdc_truncated TO cdc_consumer;

-- status and verify: read, never write.
GRANT SELECT ON employees, cdc_applied, cdc_truncated TO cdc_reader;
