\echo Use "CREATE EXTENSION cdc_capture" to load this file. \quit

CREATE FUNCTION cdc_log_employee_change() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'cdc_log_employee_change';

CREATE FUNCTION cdc_employee_emp_id_given() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'cdc_employee_emp_id_given';
