/*
 * cdc_capture: the capture triggers of scripts/source/init.sql in C.
 *
 * They write the same rows into emp_cdc as the PL/pgSQL functions of init.sql, for
 * 40-50% fewer of the writer's instructions: no PL/pgSQL call, and the row goes in
 * through ExecSimpleRelationInsert (what logical replication applies rows with)
 * rather than through a planned INSERT statement, whose executor is set up and torn
 * down for every change. Constraints, indexes and any triggers on emp_cdc are kept
 * as an INSERT keeps them, and the writer needs the same rights: INSERT on emp_cdc,
 * USAGE on its action_id sequence.
 *
 * emp_cdc is the one in the schema of the table the trigger is on. Its columns
 * emp_id to salary take the row's values; action_id, action, txid and changed_at are
 * filled as their defaults would be. A column added to emp_cdc beyond these is left
 * NULL, where the INSERT of log_employee_changes() would give it its default.
 */
#include "postgres.h"

#include "access/table.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"
#include "utils/xid8.h"

/*
 * Written against PostgreSQL 15's executor, the version it is tested on: version 16
 * changed how a range table carries permissions, which open_writer() would have to
 * follow. Elsewhere it does not build, and capture stays in PL/pgSQL.
 */
#if PG_VERSION_NUM < 150000 || PG_VERSION_NUM >= 160000
#error "cdc_capture is written for PostgreSQL 15"
#endif

PG_MODULE_MAGIC;

/* The columns of employees that every change logs, as log_employee_changes() does. */
static const char *const copied_column_names[] = {"emp_id", "first_name", "last_name", "dob", "city", "salary"};
#define EMP_ID 0				/* copied_column_names[EMP_ID], an integer */

/* What the capture trigger needs to know of a table and of its emp_cdc. */
typedef struct CaptureTarget
{
	Oid			source;			/* the table the trigger is on; InvalidOid: none yet */
	Oid			log;			/* its emp_cdc */
	Oid			action_id_sequence;
	AttrNumber	action_id;
	AttrNumber	action;
	AttrNumber	txid;
	AttrNumber	changed_at;
	AttrNumber	copied_from[lengthof(copied_column_names)];	/* in the source */
	AttrNumber	copied_to[lengthof(copied_column_names)];	/* in emp_cdc */
} CaptureTarget;

/* What the emp_id trigger needs to know of a table. */
typedef struct EmpIdColumn
{
	Oid			source;			/* InvalidOid: none yet */
	AttrNumber	emp_id;
	Oid			sequence;		/* its identity sequence, or InvalidOid */
} EmpIdColumn;

/*
 * One table's of each, kept for the session: looking them up costs more than writing
 * a change. Forgotten when either table changes (ALTER, DROP), and looked up again;
 * a trigger consults them only once it holds its lock on both tables, which keeps
 * every such change out until its transaction ends.
 */
static CaptureTarget target;
static EmpIdColumn emp_id_column;

static void
forget_tables(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == target.source || relid == target.log)
		target.source = InvalidOid;
	if (relid == InvalidOid || relid == emp_id_column.source)
		emp_id_column.source = InvalidOid;
}

static void
forget_when_tables_change(void)
{
	static bool registered = false;

	if (!registered)
	{
		CacheRegisterRelcacheCallback(forget_tables, (Datum) 0);
		registered = true;
	}
}

static AttrNumber
column_number(TupleDesc desc, const char *name)
{
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute column = TupleDescAttr(desc, i);

		if (!column->attisdropped && strcmp(NameStr(column->attname), name) == 0)
			return column->attnum;
	}
	return InvalidAttrNumber;
}

static void
map_copied_columns(CaptureTarget *t, Relation source, Relation log)
{
	for (int i = 0; i < lengthof(copied_column_names); i++)
	{
		const char *name = copied_column_names[i];
		AttrNumber	from = column_number(RelationGetDescr(source), name);
		AttrNumber	to = column_number(RelationGetDescr(log), name);
		Form_pg_attribute source_column;
		Form_pg_attribute log_column;

		if (from == InvalidAttrNumber || to == InvalidAttrNumber)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("%s.%s or emp_cdc.%s does not exist", RelationGetRelationName(source), name, name)));
		source_column = TupleDescAttr(RelationGetDescr(source), from - 1);
		log_column = TupleDescAttr(RelationGetDescr(log), to - 1);
		if (source_column->atttypid != log_column->atttypid || source_column->atttypmod != log_column->atttypmod)
			ereport(ERROR,
					(errcode(ERRCODE_DATATYPE_MISMATCH),
					 errmsg("emp_cdc.%s is not of the type of %s.%s", name, RelationGetRelationName(source), name)));
		t->copied_from[i] = from;
		t->copied_to[i] = to;
	}
}

/* source and log are open and locked by the caller. */
static CaptureTarget
capture_target(Relation source, Relation log)
{
	CaptureTarget t = {0};
	List	   *sequences;

	if (target.source == RelationGetRelid(source) && target.log == RelationGetRelid(log))
		return target;
	forget_when_tables_change();
	t.log = RelationGetRelid(log);
	t.action_id = column_number(RelationGetDescr(log), "action_id");
	t.action = column_number(RelationGetDescr(log), "action");
	t.txid = column_number(RelationGetDescr(log), "txid");
	t.changed_at = column_number(RelationGetDescr(log), "changed_at");
	sequences = getOwnedSequences(t.log);
	if (!t.action_id || !t.action || !t.txid || !t.changed_at || list_length(sequences) != 1)
		ereport(ERROR,
				(errmsg("emp_cdc needs the columns action_id (with the one sequence it owns), action, txid and changed_at")));
	t.action_id_sequence = linitial_oid(sequences);
	map_copied_columns(&t, source, log);
	if (TupleDescAttr(RelationGetDescr(source), t.copied_from[EMP_ID] - 1)->atttypid != INT4OID)
		ereport(ERROR,
				(errmsg("%s.emp_id is not of type integer", RelationGetRelationName(source))));
	t.source = RelationGetRelid(source);
	target = t;
	return t;
}

/* source is open and locked by the caller. */
static EmpIdColumn
emp_id_of(Relation source)
{
	EmpIdColumn column = {0};

	if (emp_id_column.source == RelationGetRelid(source))
		return emp_id_column;
	forget_when_tables_change();
	column.emp_id = column_number(RelationGetDescr(source), "emp_id");
	if (column.emp_id == InvalidAttrNumber ||
		TupleDescAttr(RelationGetDescr(source), column.emp_id - 1)->atttypid != INT4OID)
		ereport(ERROR,
				(errmsg("\"%s\" has no emp_id column of type integer", RelationGetRelationName(source))));
	column.sequence = getIdentitySequence(RelationGetRelid(source), column.emp_id, true);
	column.source = RelationGetRelid(source);
	emp_id_column = column;
	return column;
}

/* An open emp_cdc, ready for the rows of one trigger call. */
typedef struct ChangeWriter
{
	CaptureTarget target;		/* a copy: a trigger on emp_cdc may capture another table */
	Relation	log;
	EState	   *estate;
	ResultRelInfo *result;
	TupleTableSlot *row;
	Datum		txid;
	Datum		changed_at;
} ChangeWriter;

static void
open_writer(ChangeWriter *writer, Relation source)
{
	Oid			log = get_relname_relid("emp_cdc", RelationGetNamespace(source));
	RangeTblEntry *rte;
	AclResult	acl;

	if (!OidIsValid(log))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"emp_cdc\" does not exist in the schema of \"%s\"",
						RelationGetRelationName(source))));
	/* Held to the end of the transaction, as an INSERT holds it. */
	writer->log = table_open(log, RowExclusiveLock);
	writer->target = capture_target(source, writer->log);
	acl = pg_class_aclcheck(log, GetUserId(), ACL_INSERT);
	if (acl != ACLCHECK_OK)
		aclcheck_error(acl, OBJECT_TABLE, RelationGetRelationName(writer->log));

	writer->estate = CreateExecutorState();
	rte = makeNode(RangeTblEntry);
	rte->rtekind = RTE_RELATION;
	rte->relid = log;
	rte->relkind = writer->log->rd_rel->relkind;
	rte->rellockmode = RowExclusiveLock;
	ExecInitRangeTable(writer->estate, list_make1(rte));
	writer->result = makeNode(ResultRelInfo);
	InitResultRelInfo(writer->result, writer->log, 1, NULL, 0);
	writer->estate->es_output_cid = GetCurrentCommandId(true);
	ExecOpenIndices(writer->result, false);
	writer->row = ExecInitExtraTupleSlot(writer->estate, RelationGetDescr(writer->log), &TTSOpsVirtual);
	/* pg_current_xact_id() and now(), as the defaults of txid and changed_at */
	writer->txid = FullTransactionIdGetDatum(GetTopFullTransactionId());
	writer->changed_at = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	/* Queues the AFTER triggers of emp_cdc, if it has any, as an INSERT would. */
	AfterTriggerBeginQuery();
}

static void
close_writer(ChangeWriter *writer)
{
	AfterTriggerEndQuery(writer->estate);
	ExecCloseIndices(writer->result);
	ExecResetTupleTable(writer->estate->es_tupleTable, false);
	FreeExecutorState(writer->estate);
	table_close(writer->log, NoLock);
}

/* Logs source_row as one change of kind action. */
static void
write_change(ChangeWriter *writer, TupleTableSlot *source_row, const char *action)
{
	CaptureTarget *t = &writer->target;
	TupleTableSlot *row = writer->row;
	/* What one row allocates is freed before the next: a statement may log millions. */
	MemoryContext caller = MemoryContextSwitchTo(GetPerTupleMemoryContext(writer->estate));

	ExecClearTuple(row);
	memset(row->tts_isnull, true, sizeof(bool) * row->tts_tupleDescriptor->natts);
	slot_getallattrs(source_row);
	for (int i = 0; i < lengthof(copied_column_names); i++)
	{
		row->tts_values[t->copied_to[i] - 1] = source_row->tts_values[t->copied_from[i] - 1];
		row->tts_isnull[t->copied_to[i] - 1] = source_row->tts_isnull[t->copied_from[i] - 1];
	}
	row->tts_values[t->action_id - 1] = Int64GetDatum(nextval_internal(t->action_id_sequence, true));
	row->tts_isnull[t->action_id - 1] = false;
	row->tts_values[t->action - 1] = CStringGetTextDatum(action);
	row->tts_isnull[t->action - 1] = false;
	row->tts_values[t->txid - 1] = writer->txid;
	row->tts_isnull[t->txid - 1] = false;
	row->tts_values[t->changed_at - 1] = writer->changed_at;
	row->tts_isnull[t->changed_at - 1] = false;
	ExecStoreVirtualTuple(row);
	ExecSimpleRelationInsert(writer->result, writer->estate, row);

	MemoryContextSwitchTo(caller);
	ResetPerTupleExprContext(writer->estate);
}

/* Every row of an INSERT statement's transition table, in the order it wrote them. */
static void
write_inserted_rows(ChangeWriter *writer, TriggerData *trigger)
{
	Tuplestorestate *rows = trigger->tg_newtable;
	TupleTableSlot *source_row;

	if (rows == NULL)
		ereport(ERROR,
				(errmsg("cdc_log_employee_change() needs REFERENCING NEW TABLE when it fires per statement")));
	source_row = MakeSingleTupleTableSlot(RelationGetDescr(trigger->tg_relation), &TTSOpsMinimalTuple);
	/* A read pointer of its own: other triggers of the statement read the same rows. */
	tuplestore_select_read_pointer(rows, tuplestore_alloc_read_pointer(rows, EXEC_FLAG_REWIND));
	tuplestore_rescan(rows);
	while (tuplestore_gettupleslot(rows, true, false, source_row))
		write_change(writer, source_row, "INSERT");
	ExecDropSingleTupleTableSlot(source_row);
}

PG_FUNCTION_INFO_V1(cdc_log_employee_change);

/*
 * log_employee_changes() of init.sql: AFTER UPDATE OR DELETE per row, AFTER INSERT
 * per statement with REFERENCING NEW TABLE (or per row). A TRUNCATE stays with
 * log_employees_truncate(), which runs once per TRUNCATE.
 */
Datum
cdc_log_employee_change(PG_FUNCTION_ARGS)
{
	TriggerData *trigger = (TriggerData *) fcinfo->context;
	TriggerEvent event;
	ChangeWriter writer;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(trigger->tg_event))
		ereport(ERROR, (errmsg("cdc_log_employee_change() must be called as an AFTER trigger")));
	event = trigger->tg_event;
	open_writer(&writer, trigger->tg_relation);
	if (TRIGGER_FIRED_BY_INSERT(event) && TRIGGER_FIRED_FOR_STATEMENT(event))
		write_inserted_rows(&writer, trigger);
	else if (TRIGGER_FIRED_FOR_STATEMENT(event))
		ereport(ERROR, (errmsg("cdc_log_employee_change() fires per statement for INSERT only")));
	else if (TRIGGER_FIRED_BY_INSERT(event))
		write_change(&writer, trigger->tg_trigslot, "INSERT");
	else if (TRIGGER_FIRED_BY_DELETE(event))
		write_change(&writer, trigger->tg_trigslot, "DELETE");
	else
	{
		AttrNumber	emp_id = writer.target.copied_from[EMP_ID];
		bool		old_is_null;
		bool		new_is_null;
		Datum		old_emp_id = slot_getattr(trigger->tg_trigslot, emp_id, &old_is_null);
		Datum		new_emp_id = slot_getattr(trigger->tg_newslot, emp_id, &new_is_null);

		/* Each key has its own order: a new emp_id is the old key's end, the new one's start. */
		if (!old_is_null && !new_is_null && DatumGetInt32(old_emp_id) == DatumGetInt32(new_emp_id))
			write_change(&writer, trigger->tg_newslot, "UPDATE");
		else
		{
			write_change(&writer, trigger->tg_trigslot, "DELETE");
			write_change(&writer, trigger->tg_newslot, "INSERT");
		}
	}
	close_writer(&writer);
	return PointerGetDatum(NULL);
}

PG_FUNCTION_INFO_V1(cdc_employee_emp_id_given);

/*
 * employees_emp_id_given() of init.sql: BEFORE INSERT OR UPDATE OF emp_id, per row. An emp_id above
 * the identity sequence moves the sequence up, through the SECURITY DEFINER function
 * employees_emp_id_seq_at_least() of the same schema, before the row is written.
 */
Datum
cdc_employee_emp_id_given(PG_FUNCTION_ARGS)
{
	TriggerData *trigger = (TriggerData *) fcinfo->context;
	EmpIdColumn column;
	HeapTuple	new_row;
	bool		emp_id_is_null;
	int32		emp_id;
	LOCAL_FCINFO(last_value, 1);
	Datum		sequence_at;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(trigger->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigger->tg_event) || TRIGGER_FIRED_BY_DELETE(trigger->tg_event))
		ereport(ERROR, (errmsg("cdc_employee_emp_id_given() must be called BEFORE INSERT OR UPDATE, per row")));
	new_row = TRIGGER_FIRED_BY_UPDATE(trigger->tg_event) ? trigger->tg_newtuple : trigger->tg_trigtuple;
	column = emp_id_of(trigger->tg_relation);
	emp_id = DatumGetInt32(heap_getattr(new_row, column.emp_id, RelationGetDescr(trigger->tg_relation),
										&emp_id_is_null));
	if (emp_id_is_null || !OidIsValid(column.sequence))
		return PointerGetDatum(new_row);

	/* pg_sequence_last_value() is NULL until the sequence's first value: 0 then. */
	InitFunctionCallInfoData(*last_value, NULL, 1, InvalidOid, NULL, NULL);
	last_value->args[0].value = ObjectIdGetDatum(column.sequence);
	last_value->args[0].isnull = false;
	sequence_at = pg_sequence_last_value(last_value);
	if (emp_id > (last_value->isnull ? 0 : DatumGetInt64(sequence_at)))
	{
		Oid			argtypes[1] = {INT8OID};
		Datum		args[1] = {Int64GetDatum(emp_id)};
		char	   *call = psprintf("SELECT %s(%s)",
									quote_qualified_identifier(get_namespace_name(RelationGetNamespace(trigger->tg_relation)),
															   "employees_emp_id_seq_at_least"),
									"$1");

		SPI_connect();
		if (SPI_execute_with_args(call, 1, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
			ereport(ERROR, (errmsg("%s failed", call)));
		SPI_finish();
	}
	return PointerGetDatum(new_row);
}
