-- Destination database: the roles of the pipeline, each granted only what it needs.
-- Idempotent: run it again after init.sql in every database the pipeline uses (roles
-- belong to the server, grants to the database), as a superuser:
--
--   psql -v ON_ERROR_STOP=1 -v consumer_password=... -v reader_password=... -f roles.sql
--
-- A password comes from the psql variable, else the environment (CDC_CONSUMER_PASSWORD,
-- CDC_READER_PASSWORD), else the file the environment names (CDC_CONSUMER_PASSWORD_FILE,
-- CDC_READER_PASSWORD_FILE: Docker's secrets); without any, the role's password is left
-- as it is (a new role then has none and cannot log in over TCP until one is set).

\if :{?consumer_password}
\else
\getenv consumer_password CDC_CONSUMER_PASSWORD
\endif
\if :{?consumer_password}
\else
\getenv consumer_password_file CDC_CONSUMER_PASSWORD_FILE
\if :{?consumer_password_file}
\set consumer_password `cat -- :'consumer_password_file'`
\endif
\endif
\if :{?reader_password}
\else
\getenv reader_password CDC_READER_PASSWORD
\endif
\if :{?reader_password}
\else
\getenv reader_password_file CDC_READER_PASSWORD_FILE
\if :{?reader_password_file}
\set reader_password `cat -- :'reader_password_file'`
\endif
\endif

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

-- The consumer upserts and deletes employees and keeps cdc_applied beside them
-- (ON CONFLICT ... WHERE and RETURNING read the rows, hence SELECT). Nothing else.
GRANT SELECT, INSERT, UPDATE, DELETE ON employees, cdc_applied TO cdc_consumer;

-- status and verify: read, never write.
GRANT SELECT ON employees, cdc_applied TO cdc_reader;
