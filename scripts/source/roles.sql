-- Source database: the roles of the pipeline, each granted only what it needs.
-- Idempotent: run it again after init.sql in every database the pipeline uses (roles
-- belong to the server, grants to the database), as a superuser:
--
--   psql -v ON_ERROR_STOP=1 -v producer_password=... -v reader_password=... -f roles.sql
--
-- A password comes from the psql variable, else the environment (CDC_PRODUCER_PASSWORD,
-- CDC_READER_PASSWORD), else the file the environment names (CDC_PRODUCER_PASSWORD_FILE,
-- CDC_READER_PASSWORD_FILE: Docker's secrets); without any, the role's password is left
-- as it is (a new role then has none and cannot log in over TCP until one is set).

\if :{?producer_password}
\else
\getenv producer_password CDC_PRODUCER_PASSWORD
\endif
\if :{?producer_password}
\else
\getenv producer_password_file CDC_PRODUCER_PASSWORD_FILE
\if :{?producer_password_file}
\set producer_password `cat -- :'producer_password_file'`
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

SELECT 'CREATE ROLE cdc_producer LOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_producer') \gexec
SELECT 'CREATE ROLE cdc_reader LOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_reader') \gexec

\if :{?producer_password}
ALTER ROLE cdc_producer PASSWORD :'producer_password';
\endif
\if :{?reader_password}
ALTER ROLE cdc_reader PASSWORD :'reader_password';
\endif

SELECT format('GRANT CONNECT ON DATABASE %I TO cdc_producer, cdc_reader', current_database()) \gexec
GRANT USAGE ON SCHEMA public TO cdc_producer, cdc_reader;

-- The producer reads the change log and deletes from it what it published (the purge),
-- and keeps its watermark. It never sees employees: the trigger copies the rows.
-- LISTEN, pg_try_advisory_lock and pg_current_snapshot need no grant.
GRANT SELECT, DELETE ON emp_cdc TO cdc_producer;
GRANT SELECT, UPDATE ON cdc_offset TO cdc_producer;

-- status and verify: read, never write.
GRANT SELECT ON employees, emp_cdc, cdc_offset TO cdc_reader;
