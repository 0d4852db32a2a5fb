//! JSON parameters and result rows against a real server: what PostgreSQL stored and
//! what comes back as JSON.

use std::time::Duration;

use serde_json::{json, Value};
use twopc_participant::{Agent, AgentConfig};
use twopc_shared::gid::Gid;
use twopc_shared::msg::{ErrorKind, Finish, Request, Response};
use twopc_testkit::{ClusterOptions, PgCluster};

async fn one(agent: &Agent, seq: u64, sql: &str, params: Vec<Value>) -> Response {
    twopc_testkit::commit_one(agent, Gid::new("types", 1, seq).unwrap(), sql, params).await
}

/// A cluster named `tag` and a superuser connection to its `postgres` database.
async fn cluster_and_client(tag: &'static str) -> (PgCluster, tokio_postgres::Client, String) {
    let cluster = tokio::task::spawn_blocking(move || PgCluster::start(ClusterOptions::new(tag)))
        .await
        .unwrap()
        .unwrap();
    let url = cluster.url("postgres");
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    (cluster, db, url)
}

fn first_row(r: Response) -> serde_json::Map<String, Value> {
    match r {
        Response::Executed { mut results, .. } => results.remove(0).rows.remove(0),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_with_postgres_semantics() {
    twopc_testkit::init_tracing();
    let cluster = tokio::task::spawn_blocking(|| PgCluster::start(ClusterOptions::new("types")))
        .await
        .unwrap()
        .unwrap();
    let agent = Agent::connect(AgentConfig::new("t", cluster.url("postgres")))
        .await
        .unwrap();
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };

    // numeric: exact, as PostgreSQL prints it. Each value is compared with what the test
    // sent (not only with PostgreSQL's echo of the bound value, which a wrong bind would
    // change too): `t` says what PostgreSQL received, `n` what the agent answered.
    for (v, want) in [
        (json!("0"), "0"),
        (json!("-0.5"), "-0.5"),
        (json!("0.00000000000000000001"), "0.00000000000000000001"),
        (
            json!("123456789012345678901234567890.123"),
            "123456789012345678901234567890.123",
        ),
        (json!(10000), "10000"),
        (json!("0.0001"), "0.0001"),
        (json!("NaN"), "NaN"),
        (json!("1.50"), "1.50"),
        (json!(-12.25), "-12.25"),
    ] {
        let row = first_row(
            one(
                &agent,
                next(),
                "SELECT $1::numeric AS n, $1::numeric::text AS t",
                vec![v.clone()],
            )
            .await,
        );
        assert_eq!(row["t"], json!(want), "numeric {v} as PostgreSQL got it");
        assert_eq!(
            row["n"],
            json!(want),
            "numeric {v} as the agent answered it"
        );
    }

    // Integers, big int8 as strings, floats, bool, text, json, uuid, bytea, time types.
    let row = first_row(
        one(
            &agent,
            next(),
            "SELECT $1::int4 AS i, $2::int8 AS small, $3::int8 AS big, $4::float8 AS f, \
             $5::bool AS b, $6::text AS s, $7::jsonb AS j, $8::uuid AS u, $9::bytea AS y, \
             $10::timestamptz AS tz, $11::timestamp AS ts, $12::date AS d, $13::time AS tm, \
             $14::int4 AS nothing, 'Infinity'::float8 AS inf",
            vec![
                json!(-7),
                json!(9007199254740992i64),
                json!("9007199254740993"),
                json!(1.25),
                json!(true),
                json!("héllo 'quoted'"),
                json!({"k": [1, 2]}),
                json!("67e55044-10b1-426f-9247-bb680e5fe0c8"),
                json!("\\xdeadbeef"),
                json!("2024-01-02 03:04:05.123456+02"),
                json!("2024-01-02 03:04:05"),
                json!("2024-02-29"),
                json!("12:34:56.5"),
                Value::Null,
            ],
        )
        .await,
    );
    assert_eq!(row["i"], json!(-7));
    assert_eq!(row["small"], json!(9007199254740992i64));
    assert_eq!(row["big"], json!("9007199254740993"));
    assert_eq!(row["f"], json!(1.25));
    assert_eq!(row["b"], json!(true));
    assert_eq!(row["s"], json!("héllo 'quoted'"));
    assert_eq!(row["j"], json!({"k": [1, 2]}));
    assert_eq!(row["u"], json!("67e55044-10b1-426f-9247-bb680e5fe0c8"));
    assert_eq!(row["y"], json!("\\xdeadbeef"));
    assert_eq!(row["tz"], json!("2024-01-02T01:04:05.123456Z"));
    assert_eq!(row["ts"], json!("2024-01-02T03:04:05"));
    assert_eq!(row["d"], json!("2024-02-29"));
    assert_eq!(row["tm"], json!("12:34:56.500000"));
    assert_eq!(row["nothing"], Value::Null);
    assert_eq!(row["inf"], json!("Infinity"));
    // Keys keep the column order.
    let keys: Vec<&String> = row.keys().collect();
    assert_eq!(keys[0], "i");
    assert_eq!(keys[14], "inf");

    // Arrays both ways.
    let row = first_row(
        one(
            &agent,
            next(),
            "SELECT $1::int4[] AS a, $2::text[] AS t",
            vec![json!([1, null, 3]), json!(["a\"b", "c"])],
        )
        .await,
    );
    assert_eq!(row["a"], json!([1, null, 3]));
    assert_eq!(row["t"], json!(["a\"b", "c"]));

    // Values that do not fit are refused before anything runs, naming the parameter.
    for (sql, v) in [
        ("SELECT $1::int4", json!("abc")),
        ("SELECT $1::int4", json!(3.5)),
        ("SELECT $1::int4", json!(1u64 << 40)),
        ("SELECT $1::text", json!({})),
    ] {
        match one(&agent, next(), sql, vec![v.clone()]).await {
            Response::Failed(e) => {
                assert_eq!(e.kind, ErrorKind::BadParam, "{v}: {e}");
                assert!(e.message.contains("$1"), "{}", e.message);
            }
            other => panic!("{v} accepted: {other:?}"),
        }
    }
    // A value of the right JSON kind that the type's input function rejects is a bad
    // parameter too (a 400), named, with PostgreSQL's code; an error while the statement
    // runs is not.
    for (sql, v, code) in [
        ("SELECT $1::date", json!("2024-02-30"), "22008"),
        ("SELECT 1, $1::interval", json!("one day"), "22007"),
        ("SELECT $1::int4range", json!("[5,1)"), "22000"),
        ("SELECT $1::inet", json!("300.1.1.1"), "22P02"),
    ] {
        match one(&agent, next(), sql, vec![v.clone()]).await {
            Response::Failed(e) => {
                assert_eq!(e.kind, ErrorKind::BadParam, "{v}: {e}");
                assert_eq!(e.sqlstate.as_deref(), Some(code), "{v}: {e}");
                assert!(e.message.starts_with("parameter $1: "), "{}", e.message);
            }
            other => panic!("{v} accepted: {other:?}"),
        }
    }
    match one(&agent, next(), "SELECT 1 / $1::int4", vec![json!(0)]).await {
        Response::Failed(e) => assert_eq!(
            (e.kind, e.sqlstate.as_deref()),
            (ErrorKind::Sql, Some("22012")),
            "{e}"
        ),
        other => panic!("divided by zero: {other:?}"),
    }
    // void (pg_sleep and friends) reads as null.
    let row = first_row(one(&agent, next(), "SELECT pg_sleep(0) AS s", vec![]).await);
    assert_eq!(row["s"], Value::Null);

    // What used to be dropped or refused (issue 18): a 2-D array, infinite timestamps
    // and dates, a repeated column name, and types with no JSON form of their own (read
    // as PostgreSQL's text output).
    let row = first_row(
        one(
            &agent,
            next(),
            "SELECT '{{1,2},{3,4}}'::int[] AS m, 'infinity'::timestamptz AS inf, \
             '-infinity'::date AS ninf, 1 AS x, 2 AS x, interval '1 day 02:00' AS iv, \
             '10.0.0.1/8'::inet AS ip, '[1,5)'::int4range AS r, '12.50'::money AS cash, \
             B'101' AS bits, ROW(1, 'a', interval '1 hour') AS rec, \
             ARRAY[interval '1 day', NULL] AS ivs, '[0:1]={7,8}'::int[] AS bounded",
            vec![],
        )
        .await,
    );
    assert_eq!(row["m"], json!([[1, 2], [3, 4]]));
    assert_eq!(row["inf"], json!("infinity"));
    assert_eq!(row["ninf"], json!("-infinity"));
    assert_eq!((&row["x"], &row["x_2"]), (&json!(1), &json!(2)));
    assert_eq!(row["iv"], json!("1 day 02:00:00"));
    assert_eq!(row["ip"], json!("10.0.0.1/8"));
    assert_eq!(row["r"], json!("[1,5)"));
    assert_eq!(row["cash"], json!("$12.50"));
    assert_eq!(row["bits"], json!("101"));
    assert_eq!(row["rec"], json!([1, "a", "01:00:00"]));
    assert_eq!(row["ivs"], json!(["1 day", null]));
    assert_eq!(row["bounded"], json!("[0:1]={7,8}"));
    drop(cluster);
}

/// A statement whose rows cannot be returned (here: more bytes than the answer may
/// carry) in a transaction that commits all the same says so in its result: before,
/// its result was empty without a word, as if PostgreSQL had returned no row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_cannot_be_returned_after_a_commit_say_so() {
    twopc_testkit::init_tracing();
    let (cluster, db, url) = cluster_and_client("types_after").await;
    db.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let mut config = AgentConfig::new("t", url);
    config.max_result_bytes = 4 * 1024;
    let agent = Agent::connect(config).await.unwrap();
    let r = branch(
        &agent,
        100,
        &["INSERT INTO t VALUES (1)", "SELECT repeat('x', 10000) AS v"],
        Finish::Commit,
    )
    .await;
    let n: i64 = db
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    match r {
        Response::Executed { results, outcome } => {
            assert_eq!(outcome, twopc_shared::msg::BranchOutcome::Committed);
            assert_eq!(n, 1, "the insert committed");
            assert!(results[1].rows.is_empty());
            let why = results[1].error.as_deref().unwrap_or("");
            assert!(why.contains("could not be returned"), "{why:?}");
        }
        // Also honest: nothing committed, and the answer says why.
        Response::Failed(e) => assert_eq!(n, 0, "failed ({e}) but the insert committed"),
        other => panic!("unexpected {other:?}"),
    }
    drop(cluster);
}

async fn branch(agent: &Agent, seq: u64, sqls: &[&str], finish: Finish) -> Response {
    let exec = twopc_testkit::branch(Gid::new("types", 3, seq).unwrap(), sqls, finish, None);
    agent
        .handle(Request::Execute(exec), Duration::from_secs(10))
        .await
}

/// Asking the server for a value's text runs the input function of its type, and a
/// domain's CHECK can call any function: that happens in a read-only savepoint rolled
/// back at once, so it neither writes nor changes the pooled session. And in an interactive request, a later statement's error is the answer, not
/// the earlier value the aborted transaction could no longer show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_output_has_no_side_effects() {
    twopc_testkit::init_tracing();
    let (cluster, db, url) = cluster_and_client("types_side").await;
    db.batch_execute(
        "CREATE TABLE side (n int);
         CREATE FUNCTION writes(v int) RETURNS bool LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO side VALUES (v); RETURN true; END $$;
         CREATE FUNCTION moves(v int) RETURNS bool LANGUAGE plpgsql AS
           $$ BEGIN PERFORM set_config('search_path', 'nowhere', false); RETURN true; END $$;
         CREATE DOMAIN writing AS int CHECK (writes(VALUE));
         CREATE DOMAIN moving AS int CHECK (moves(VALUE));",
    )
    .await
    .unwrap();
    let agent = Agent::connect(AgentConfig::new("t", url)).await.unwrap();
    // A domain field of an anonymous record is shown as the server's text. Its CHECK
    // changes the session's search_path: rolled back with the read-only transaction.
    for (seq, finish) in [(1, Finish::Commit), (2, Finish::Prepare)] {
        let r = branch(&agent, seq, &["SELECT ROW(42::moving, 'x') AS v"], finish).await;
        match r {
            Response::Executed { results, .. } => {
                assert_eq!(results[0].rows[0]["v"], json!(["42", "x"]), "{finish:?}")
            }
            other => panic!("{finish:?}: {other:?}"),
        }
    }
    let _ = db
        .batch_execute(&format!(
            "ROLLBACK PREPARED {}",
            Gid::new("types", 3, 2).unwrap().sql_literal()
        ))
        .await;
    // Its CHECK writes: refused in the read-only savepoint, so that value cannot be
    // shown, and the branch fails before it commits (nothing written, not even the row
    // the client's own cast wrote).
    match branch(&agent, 5, &["SELECT ROW(7::writing) AS v"], Finish::Commit).await {
        Response::Failed(e) => {
            assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
            assert_eq!(e.statement_index, Some(0), "{e}");
            assert!(e.message.contains("read-only"), "{e}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let n: i64 = db
        .query_one("SELECT count(*) FROM side", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a branch whose rows could not be returned committed");
    // Every pooled session's search_path is intact: a plain table still resolves.
    for seq in 10..18 {
        match branch(
            &agent,
            seq,
            &["SELECT count(*) AS n FROM side"],
            Finish::Commit,
        )
        .await
        {
            Response::Executed { results, .. } => assert_eq!(results[0].rows[0]["n"], json!(0)),
            other => panic!("the pooled session changed: {other:?}"),
        }
    }

    // Interactive: the value's text could not be had once a later statement aborted the
    // transaction; that statement's error is the answer.
    match branch(
        &agent,
        4,
        &["SELECT interval '1 day' AS v", "SELECT 1 / 0"],
        Finish::Keep,
    )
    .await
    {
        Response::Failed(e) => {
            assert_eq!(e.sqlstate.as_deref(), Some("22012"), "{e}");
            assert_eq!(e.statement_index, Some(1), "{e}");
        }
        other => panic!("unexpected {other:?}"),
    }
    drop(cluster);
}

/// A value shown as the server's text is what PostgreSQL prints inside the branch's own
/// transaction: with the settings it made (`SET LOCAL IntervalStyle`, `search_path`)
/// and the objects it created, also when the branch prepares or commits in the same
/// request. Before, the text was asked for after the PREPARE or COMMIT, in another
/// transaction: `1 day` instead of `P1D`, and a table the prepared branch created was
/// an OID. (The table's name is cast when the statement runs: every statement of a
/// request is parsed before the first runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_output_is_the_branchs_own() {
    twopc_testkit::init_tracing();
    let (cluster, db, url) = cluster_and_client("types_own").await;
    db.batch_execute("CREATE SCHEMA app; CREATE TABLE app.acct (id int)")
        .await
        .unwrap();
    let agent = Agent::connect(AgentConfig::new("t", url)).await.unwrap();
    for (seq, finish) in [
        (20, Finish::Commit),
        (21, Finish::Prepare),
        (22, Finish::Keep),
    ] {
        let table = format!("fresh_{seq}");
        let create = format!("CREATE TABLE {table} (id int)");
        let select = format!(
            "SELECT interval '1 day 2 hours' AS i, 'app.acct'::regclass AS a, \
             '{table}'::text::regclass AS f"
        );
        let sqls = [
            "SET LOCAL IntervalStyle = 'iso_8601'",
            "SET LOCAL search_path = app, public",
            create.as_str(),
            select.as_str(),
        ];
        match branch(&agent, seq, &sqls, finish).await {
            Response::Executed { results, .. } => {
                let row = &results[3].rows[0];
                assert_eq!(row["i"], json!("P1DT2H"), "{finish:?}: {row:?}");
                assert_eq!(row["a"], json!("acct"), "{finish:?}: {row:?}");
                assert_eq!(row["f"], json!(table), "{finish:?}: {row:?}");
            }
            other => panic!("{finish:?}: {other:?}"),
        }
    }
    let _ = db
        .batch_execute(&format!(
            "ROLLBACK PREPARED {}",
            Gid::new("types", 3, 21).unwrap().sql_literal()
        ))
        .await;
    drop(cluster);
}
