-- Source database: the roles of the pipeline, each granted only what it needs.
-- Idempotent: run it again after init.sql in every database the pipeline uses (roles
-- belong to the server, grants to the database), as a superuser:
--
--   psql -v ON_ERROR_STOP=1 -v producer_password=... -v reader_password=... -f roles.sql
--
-- The passwords: psql -v producer_password=..., or the environment's CDC_PRODUCER_PASSWORD,
-- or the file CDC_PRODUCER_PASSWORD_FILE names (and the same for the reader); see
-- role_passwords.psql. Without any, a role's password is left as it is (a new role then
-- has none and cannot log in over TCP until one is set).
\ir ../role_passwords.psql

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
-- pg_try_advisory_lock and pg_current_snapshot need no grant.
GRANT SELECT, DELETE ON emp_cdc TO cdc_producer;
GRANT SELECT, UPDATE ON cdc_offset TO cdc_producer;
-- How far the change log's numbering went, by which it sees a source that went back
-- in time (with the cluster's identity and timeline, below).
GRANT SELECT ON SEQUENCE emp_cdc_action_id_seq TO cdc_producer;
-- The cluster's identity and timeline (restored, re-created, failed over): readable by
-- superusers only unless granted, and they tell nothing of the data.
GRANT EXECUTE ON FUNCTION pg_control_system(), pg_control_checkpoint() TO cdc_producer;
-- Its commit of a logical decoding message flushes the source's WAL before a batch is
-- published, when no writer's commit did. Every role may by default; granted here so
-- that a source that revoked it from PUBLIC still lets the producer.
GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO cdc_producer;

-- status and verify: read, never write.
GRANT SELECT ON employees, emp_cdc, cdc_offset TO cdc_reader;
