#!/usr/bin/env python3
"""Writes the claim shapes that docs/design/postgres-store.md compares, as pgbench scripts:

    python3 shapes.py DIR    # DIR/{cycle,two-step,no-cursor}-{4,256}.sql

Each pgbench client plays one daemon (:client_id is its id) running the loop's cycle over and over:
record the endings of its previous claim (every task "done"), claim up to BATCH due rows, delete
them and record their running attempts. `cycle` is the recommended statement as the store would
send it; pgbench keeps one row per \\gset, so its rows come back folded into arrays, which also feed
the next cycle's endings and the cursor."""
import sys

PRIORITIES = """priorities(p) AS (
    SELECT (SELECT priority FROM foreman_task ORDER BY priority DESC LIMIT 1)
  UNION ALL
    SELECT (SELECT priority FROM foreman_task WHERE priority < priorities.p
            ORDER BY priority DESC LIMIT 1)
    FROM priorities WHERE priorities.p IS NOT NULL
)"""


def claim(limit, cursor=True):
    after = """
    CROSS JOIN LATERAL (
        SELECT coalesce(max(c.run_after), '-infinity') AS run_after, coalesce(max(c.id), 0) AS id
        FROM unnest(:cp::smallint[], :cr::timestamptz[], :ci::bigint[]) AS c(p, run_after, id)
        WHERE c.p = priorities.p) AS after""" if cursor else ""
    cond = "\n          AND (run_after, id) > (after.run_after, after.id)" if cursor else ""
    return f"""claimed AS MATERIALIZED (
    SELECT t.ctid FROM priorities{after}
    CROSS JOIN LATERAL (
        SELECT ctid FROM foreman_task
        WHERE priority = priorities.p AND run_after <= now(){cond}
          AND task_name = ANY(:names)
        ORDER BY run_after, id
        LIMIT {limit}
        FOR UPDATE SKIP LOCKED) AS t
    LIMIT {limit}
)"""


ENDED = """ended AS (
    INSERT INTO foreman_run AS r (task_id, attempt, task_name, state, daemon_id, finished_at, error, retry_at)
    SELECT e.task_id, e.attempt, e.task_name, e.state, :client_id,
           now() - make_interval(secs => e.finished_ago), e.error,
           now() + make_interval(secs => e.retry_in)
    FROM unnest(:e_ids::bigint[], :e_attempts::int[], :e_names::text[], :e_states::text[],
                :e_ago::float8[], :e_errors::text[], :e_retry::float8[])
         AS e(task_id, attempt, task_name, state, finished_ago, error, retry_in)
    ON CONFLICT (task_id, attempt) DO UPDATE
    SET state = excluded.state, finished_at = excluded.finished_at, error = excluded.error,
        retry_at = excluded.retry_at
)"""


def gone(ctids):
    return f"""gone AS (
    DELETE FROM foreman_task WHERE ctid = ANY({ctids})
    RETURNING id, task_name, args, kwargs, created_at, run_after, priority, attempt, origin
), started AS (
    INSERT INTO foreman_run (task_id, attempt, task_name, state, daemon_id, enqueued_at, started_at)
    SELECT id, attempt, task_name, 'running', :client_id, created_at, now() FROM gone
)"""


def result(limit):
    return f"""SELECT coalesce(array_agg(id), '{{}}') AS e_ids, coalesce(array_agg(attempt), '{{}}') AS e_attempts,
       coalesce(array_agg(task_name), '{{}}') AS e_names,
       coalesce(array_agg('done'::text), '{{}}') AS e_states,
       coalesce(array_agg(0.001::float8), '{{}}') AS e_ago,
       coalesce(array_agg(NULL::text), '{{}}') AS e_errors,
       coalesce(array_agg(NULL::float8), '{{}}') AS e_retry,
       array_agg(args) AS r_args, array_agg(kwargs) AS r_kwargs, array_agg(created_at) AS r_created,
       array_agg(priority) AS r_priority, array_agg(origin) AS r_origin,
       '{{0}}' AS cp, ARRAY[coalesce(max(run_after), (:cr::timestamptz[])[1], '-infinity')] AS cr,
       ARRAY[coalesce(max(id), (:ci::bigint[])[1], 0)] AS ci,
       CASE WHEN count(id) < {limit} THEN
           (SELECT extract(epoch FROM min(n.run_after) - now())::float8
            FROM priorities CROSS JOIN LATERAL (
                SELECT run_after FROM foreman_task WHERE priority = priorities.p AND run_after > now()
                ORDER BY run_after LIMIT 1) AS n)
       END AS next_due_in
FROM (SELECT) AS one LEFT JOIN gone ON true \\gset"""


def cycle(limit, cursor=True):
    return ("WITH RECURSIVE " + PRIORITIES + ", " + claim(limit, cursor) + ", " + ENDED + ", "
            + gone("ARRAY(SELECT ctid FROM claimed)") + "\n" + result(limit) + "\n")


def two_step(limit):
    select = ("WITH RECURSIVE " + PRIORITIES + ", " + claim(limit)
              + "\nSELECT coalesce(array_agg(ctid), '{}') AS ctids FROM claimed \\gset\n")
    return ("BEGIN;\n" + select + "WITH RECURSIVE " + PRIORITIES + ", " + ENDED + ", "
            + gone(":ctids::tid[]") + "\n" + result(limit) + "\nCOMMIT;\n")


def main():
    out = sys.argv[1]
    for batch in (4, 256):
        with open(f"{out}/cycle-{batch}.sql", "w") as f:
            f.write("-- The recommended cycle: one autocommit statement (endings, claim, delete, history).\n"
                    + cycle(batch))
        with open(f"{out}/two-step-{batch}.sql", "w") as f:
            f.write("-- BEGIN; lock the due rows; then endings, delete and history; COMMIT.\n" + two_step(batch))
        with open(f"{out}/no-cursor-{batch}.sql", "w") as f:
            f.write("-- As cycle, each claim starting at the head of the due index.\n"
                    + cycle(batch, cursor=False))


main()
