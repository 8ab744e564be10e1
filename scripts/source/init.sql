-- Source database: the employees table, the change log its triggers fill, and the
-- producer's position in that log.

CREATE TABLE IF NOT EXISTS employees (
    emp_id     INT PRIMARY KEY,
    first_name VARCHAR(100),
    last_name  VARCHAR(100),
    dob        DATE,
    city       VARCHAR(100),
    salary     INT
);

-- One row per changed employee row, in the order the changes were made.
-- txid is the writing transaction: the producer publishes a change only once that
-- transaction is visible (committed), so a transaction that took a small action_id
-- and commits late is still published, and a rolled-back one never is.
CREATE TABLE IF NOT EXISTS emp_cdc (
    action_id  BIGSERIAL PRIMARY KEY,
    emp_id     INT,
    first_name VARCHAR(100),
    last_name  VARCHAR(100),
    dob        DATE,
    city       VARCHAR(100),
    salary     INT,
    action     VARCHAR(10) NOT NULL,
    txid       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    changed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS emp_cdc_txid ON emp_cdc (txid);

-- The producer's watermark. Every transaction visible in `snapshot` has been
-- published. While a batch is being published, `batch_snapshot` is the snapshot
-- that closes it and `batch_action_id` the last change of it already acknowledged
-- by Kafka. `last_action_id` is the newest change published, for people.
CREATE TABLE IF NOT EXISTS cdc_offset (
    id              INT PRIMARY KEY CHECK (id = 1),
    last_action_id  BIGINT NOT NULL DEFAULT 0,
    snapshot        pg_snapshot NOT NULL DEFAULT '1:1:',
    batch_snapshot  pg_snapshot,
    batch_action_id BIGINT NOT NULL DEFAULT 0
);
INSERT INTO cdc_offset (id) VALUES (1) ON CONFLICT (id) DO NOTHING;
-- The source the watermark was taken in: cluster, timeline and database. When the
-- producer finds another (a restore, a re-creation, a failover), it checks that the
-- source's action_ids did not go back below those already on the topic.
ALTER TABLE cdc_offset ADD COLUMN IF NOT EXISTS source_identity TEXT;

-- Every change is logged as the full row it leaves behind, so applying the newest
-- change of an employee is enough to reproduce its state.
-- An UPDATE that changes emp_id is logged as a DELETE of the old key and an INSERT of
-- the new one, as each key has its own order.
CREATE OR REPLACE FUNCTION log_employee_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND OLD.emp_id IS DISTINCT FROM NEW.emp_id) THEN
        INSERT INTO emp_cdc (emp_id, first_name, last_name, dob, city, salary, action)
        VALUES (OLD.emp_id, OLD.first_name, OLD.last_name, OLD.dob, OLD.city, OLD.salary, 'DELETE');
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND OLD.emp_id IS DISTINCT FROM NEW.emp_id) THEN
        INSERT INTO emp_cdc (emp_id, first_name, last_name, dob, city, salary, action)
        VALUES (NEW.emp_id, NEW.first_name, NEW.last_name, NEW.dob, NEW.city, NEW.salary, 'INSERT');
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO emp_cdc (emp_id, first_name, last_name, dob, city, salary, action)
        VALUES (NEW.emp_id, NEW.first_name, NEW.last_name, NEW.dob, NEW.city, NEW.salary, 'UPDATE');
    END IF;
    RETURN NULL;
END;
$$;

-- Wakes the producer when a transaction that changed employees commits
-- (notifications are delivered at commit), so it need not poll often.
CREATE OR REPLACE FUNCTION notify_employee_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('emp_cdc', '');
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER employee_audit_trigger
    AFTER INSERT OR UPDATE OR DELETE ON employees
    FOR EACH ROW EXECUTE FUNCTION log_employee_changes();

-- A TRUNCATE is logged as one change, action 'TRUNCATE', never as a DELETE per row: a
-- REPEATABLE READ or SERIALIZABLE transaction would list the rows of its old snapshot
-- and miss those committed since, which the TRUNCATE removes all the same. The trigger
-- fires once TRUNCATE holds its ACCESS EXCLUSIVE lock, so every change to a row it
-- removes has a smaller action_id (its writer committed before the lock was granted)
-- and every later change a larger one: the destination deletes every row whose newest
-- change is older, and skips every older change still to come.
CREATE OR REPLACE FUNCTION log_employees_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO emp_cdc (action) VALUES ('TRUNCATE');
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER employee_truncate_trigger
    BEFORE TRUNCATE ON employees
    FOR EACH STATEMENT EXECUTE FUNCTION log_employees_truncate();

CREATE OR REPLACE TRIGGER employee_notify_trigger
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON employees
    FOR EACH STATEMENT EXECUTE FUNCTION notify_employee_changes();
