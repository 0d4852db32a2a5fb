//! Every type the server's catalogue has, through the agent: a corpus generated from
//! `pg_type` (each base type with binary I/O, an array of each, a domain, an enum, a
//! composite, every range and multirange type), not a hand-picked list. For each type a
//! sample value is found by trying candidate literals against the type's own input
//! function; then the value must come back from a row in its documented JSON form —
//! PostgreSQL's own text output for every type without a JSON form of its own — and bound
//! as a parameter, that JSON must give PostgreSQL the same value again.

use serde_json::{json, Value};
use twopc_participant::{Agent, AgentConfig};
use twopc_shared::gid::Gid;
use twopc_shared::msg::Response;
use twopc_testkit::{ClusterOptions, PgCluster};

/// Literals tried, in order, as a sample of each type (the first its input accepts).
const CANDIDATES: &[&str] = &[
    "1",
    "t",
    "x",
    "1.5",
    "2000-01-02",
    "2000-01-02 03:04:05",
    "03:04:05",
    "03:04:05+02",
    "1 day 02:03:04",
    "127.0.0.1",
    "10.0.0.0/8",
    "08:00:2b:01:02:03",
    "08:00:2b:01:02:03:04:05",
    "(1,2)",
    "((0,0),(1,1))",
    "<(0,0),1>",
    "{1,2,3}",
    "[(0,0),(1,1)]",
    "((0,0),(1,1),(1,0))",
    "0/16B3748",
    "a:1 b:2",
    "a & b",
    "00000000-0000-0000-0000-000000000001",
    "\\x0102",
    "{\"a\": [1, 2]}",
    "$.a",
    "<a>x</a>",
    "10:20:10,14,15",
    "pg_catalog",
    "int4",
    "pg_class",
    "now",
    "now()",
    "+(integer,integer)",
    "+",
    "english",
    "simple",
    "postgres",
    "C",
    "1 2",
    "=r/postgres",
    "101",
];

async fn query(agent: &Agent, seq: u64, sql: &str, params: Vec<Value>) -> Result<Value, String> {
    let r =
        twopc_testkit::commit_one(agent, Gid::new("corpus", 1, seq).unwrap(), sql, params).await;
    match r {
        Response::Executed { mut results, .. } => {
            let mut rows = results.remove(0).rows;
            if rows.len() != 1 {
                return Err(format!("{} rows", rows.len()));
            }
            rows.remove(0)
                .remove("v")
                .ok_or_else(|| "no column v".into())
        }
        Response::Failed(e) => Err(e.to_string()),
        other => Err(format!("{other:?}")),
    }
}

/// The JSON the agent must answer for a value of type `typname` whose text output is
/// `text`: the documented JSON form of the types that have one, else the text itself.
fn expected(typname: &str, text: &str) -> Value {
    match typname {
        "bool" => json!(text == "t"),
        "int2" | "int4" | "oid" => json!(text.parse::<i64>().unwrap()),
        "int8" => {
            let n: i64 = text.parse().unwrap();
            if n.abs() <= 1 << 53 {
                json!(n)
            } else {
                json!(text)
            }
        }
        "float4" | "float8" => match text {
            "NaN" | "Infinity" | "-Infinity" => json!(text),
            _ => json!(text.parse::<f64>().unwrap()),
        },
        "json" | "jsonb" => serde_json::from_str(text).unwrap(),
        // Date/time types with a JSON form (RFC 3339): compared through the parameter
        // round trip instead (the text output's layout depends on DateStyle).
        "timestamp" | "timestamptz" | "date" | "time" => Value::Null,
        _ => json!(text),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catalogue_type_reads_and_binds() {
    twopc_testkit::init_tracing();
    let cluster = tokio::task::spawn_blocking(|| PgCluster::start(ClusterOptions::new("corpus")))
        .await
        .unwrap()
        .unwrap();
    let url = cluster.url("postgres");
    let agent = Agent::connect(AgentConfig::new("t", url.clone()))
        .await
        .unwrap();
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    db.batch_execute(
        "CREATE TYPE corpus_mood AS ENUM ('sad', 'ok');
         CREATE DOMAIN corpus_pos AS int4 CHECK (VALUE > 0);
         CREATE TYPE corpus_pair AS (a int4, b text, c interval, d int4[]);",
    )
    .await
    .unwrap();
    let mut seq = 0u64;
    let mut next = || {
        seq += 1;
        seq
    };

    // Base types with binary I/O that are not the array type of another.
    let base = db
        .query(
            "SELECT t.typname, t.typarray <> 0 FROM pg_type t
             WHERE t.typtype = 'b' AND t.typnamespace = 'pg_catalog'::regnamespace
               AND t.typisdefined AND t.typreceive <> 0 AND t.typsend <> 0
               AND NOT EXISTS (SELECT 1 FROM pg_type e WHERE e.typarray = t.oid)
             ORDER BY t.oid",
            &[],
        )
        .await
        .unwrap();
    let mut covered = Vec::new();
    let mut arrays = 0;
    let mut no_sample = Vec::new();
    let mut failures = Vec::new();
    for row in &base {
        let typname: String = row.get(0);
        let has_array: bool = row.get(1);
        // A sample: the first candidate the type's input accepts, as the server prints it
        // (its output function: a cast to text may differ, inet's shows the netmask).
        let mut sample = None;
        for c in CANDIDATES {
            let sql =
                format!("SELECT pg_catalog.format('%s', CAST($1::text AS pg_catalog.{typname}))");
            if let Ok(r) = db.query_one(sql.as_str(), &[c]).await {
                sample = Some(r.get::<_, String>(0));
                break;
            }
        }
        let Some(text) = sample else {
            no_sample.push(typname);
            continue;
        };
        let ty = format!("pg_catalog.{typname}");
        // Read from a row.
        let sql = format!("SELECT CAST($1::text AS {ty}) AS v");
        let v = match query(&agent, next(), &sql, vec![json!(text)]).await {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{typname}: reading {text:?}: {e}"));
                continue;
            }
        };
        let want = expected(&typname, &text);
        if !want.is_null() && v != want {
            failures.push(format!("{typname}: {text:?} read as {v}, want {want}"));
        }
        // Bound as a parameter, the answer gives PostgreSQL the same value again.
        let sql = format!("SELECT pg_catalog.format('%s', $1::{ty}) AS v");
        match query(&agent, next(), &sql, vec![v.clone()]).await {
            Ok(back) if back == json!(text) => {}
            Ok(back) => failures.push(format!(
                "{typname}: {v} bound back is {back}, want {text:?}"
            )),
            // Types PostgreSQL cannot compare or cast back from text are reported, not
            // skipped.
            Err(e) => failures.push(format!("{typname}: binding {v}: {e}")),
        }
        // An array of it, with a NULL: nested, each element as above.
        if has_array {
            let sql = format!("SELECT ARRAY[CAST($1::text AS {ty}), NULL] AS v");
            match query(&agent, next(), &sql, vec![json!(text)]).await {
                Ok(a) if a == json!([v.clone(), null]) => arrays += 1,
                Ok(a) => failures.push(format!("{typname}[]: read as {a}, want [{v}, null]")),
                Err(e) => failures.push(format!("{typname}[]: {e}")),
            }
        }
        covered.push(typname);
    }

    // A domain, an enum, a composite (with an array and an interval inside).
    for (sql, want) in [
        ("SELECT 5::corpus_pos AS v", json!(5)),
        ("SELECT 'ok'::corpus_mood AS v", json!("ok")),
        (
            "SELECT ROW(1, 'a', interval '1 day', '{{1,2},{3,4}}')::corpus_pair AS v",
            json!({"a": 1, "b": "a", "c": "1 day", "d": [[1, 2], [3, 4]]}),
        ),
        (
            "SELECT ARRAY['ok', 'sad']::corpus_mood[] AS v",
            json!(["ok", "sad"]),
        ),
    ] {
        match query(&agent, next(), sql, vec![]).await {
            Ok(v) if v == want => {}
            other => failures.push(format!("{sql}: {other:?}, want {want}")),
        }
    }

    // Composites bound from their JSON form (and from text), alone and in an array; a
    // field the type lacks is refused before anything runs.
    let pair = json!({"a": 1, "b": "x \"y\" \\ z", "c": "1 day", "d": [[1, 2], [3, null]]});
    for (sql, param, want) in [
        ("SELECT $1::corpus_pair AS v", pair.clone(), pair.clone()),
        (
            "SELECT $1::corpus_pair AS v",
            json!("(2,b,,)"),
            json!({"a": 2, "b": "b", "c": null, "d": null}),
        ),
        (
            "SELECT $1::corpus_pair[] AS v",
            json!([pair.clone(), null, {"b": "only b"}]),
            json!([pair.clone(), null, {"a": null, "b": "only b", "c": null, "d": null}]),
        ),
        ("SELECT $1::corpus_pos AS v", json!(7), json!(7)),
        (
            "SELECT $1::corpus_mood[] AS v",
            json!(["sad"]),
            json!(["sad"]),
        ),
    ] {
        match query(&agent, next(), sql, vec![param.clone()]).await {
            Ok(v) if v == want => {}
            other => failures.push(format!("{sql} with {param}: {other:?}, want {want}")),
        }
    }
    match query(
        &agent,
        next(),
        "SELECT $1::corpus_pair AS v",
        vec![json!({"zz": 1})],
    )
    .await
    {
        Err(e) if e.contains("no field \"zz\"") && e.contains("$1") => {}
        other => failures.push(format!("an unknown field was not refused: {other:?}")),
    }

    // Every range and multirange type, built from a sample of its subtype.
    let ranges = db
        .query(
            "SELECT r.rngtypid::regtype::text, r.rngmultitypid::regtype::text,
                    r.rngsubtype::regtype::text FROM pg_range r ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let mut range_types = 0;
    for r in &ranges {
        let (range, multi, sub): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let mut done = false;
        for c in CANDIDATES {
            let probe = format!("SELECT {range}(CAST($1::text AS {sub}), CAST($1::text AS {sub}), '[]')::text, {multi}({range}(CAST($1::text AS {sub}), CAST($1::text AS {sub}), '[]'))::text");
            let Ok(row) = db.query_one(probe.as_str(), &[c]).await else {
                continue;
            };
            let (rtext, mtext): (String, String) = (row.get(0), row.get(1));
            for (ty, text) in [(&range, &rtext), (&multi, &mtext)] {
                let sql = format!("SELECT CAST($1::text AS {ty}) AS v");
                match query(&agent, next(), &sql, vec![json!(text)]).await {
                    Ok(v) if v == json!(text) => {}
                    other => failures.push(format!("{ty}: {other:?}, want {text:?}")),
                }
                let sql = format!("SELECT pg_catalog.format('%s', $1::{ty}) AS v");
                match query(&agent, next(), &sql, vec![json!(text)]).await {
                    Ok(v) if v == json!(text) => {}
                    other => failures.push(format!("{ty} bound: {other:?}, want {text:?}")),
                }
            }
            range_types += 2;
            done = true;
            break;
        }
        if !done {
            no_sample.push(range);
        }
    }

    println!(
        "type corpus: {} base types read and bound, {arrays} arrays of them, {range_types} range and multirange types, a domain, an enum, a composite; no sample literal for {}: {:?}",
        covered.len(),
        no_sample.len(),
        no_sample
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The catalogue of PostgreSQL 15 has about 80 such base types; a corpus that found
    // samples for only a few would prove little.
    assert!(
        covered.len() >= 60,
        "only {} base types covered",
        covered.len()
    );
    drop(cluster);
}
