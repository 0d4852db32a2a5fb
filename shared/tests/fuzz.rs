//! Property-based fuzzing of everything that parses bytes from the network: the frame
//! decoder and the message decoder. No input may panic or allocate beyond the frame
//! bound.

use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};
use twopc_shared::codec::FrameCodec;
use twopc_shared::gid::Gid;
use twopc_shared::msg::{ExecuteBranch, Finish, Request, RequestFrame, ResponseFrame, Statement};

const MAX: usize = 4096;

fn valid_frame() -> BytesMut {
    let mut c: FrameCodec<RequestFrame, RequestFrame> = FrameCodec::new(MAX);
    let mut buf = BytesMut::new();
    c.encode(
        RequestFrame {
            id: 7,
            timeout_ms: 100,
            body: Request::Execute(ExecuteBranch {
                gid: Gid::new("c1", 2, 3).unwrap(),
                isolation: Default::default(),
                statements: vec![Statement {
                    sql: "UPDATE acct SET bal = bal + $1 WHERE id = $2".into(),
                    params: vec![serde_json::json!(5), serde_json::json!("x")],
                }],
                finish: Finish::Prepare,
                read_only_vote: true,
                continues: false,
                decision: None,
                expires_in_ms: Some(10_000),
            }),
        },
        &mut buf,
    )
    .unwrap();
    buf
}

/// Decodes until the buffer is exhausted or an error; returns how many frames decoded.
fn drain<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> usize {
    let mut c: FrameCodec<T, T> = FrameCodec::new(MAX);
    let mut buf = BytesMut::from(bytes);
    let mut n = 0;
    while let Ok(Some(_)) = c.decode(&mut buf) {
        n += 1;
        assert!(n <= bytes.len(), "decoder loops without consuming input");
    }
    n
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        drain::<RequestFrame>(&bytes);
        drain::<ResponseFrame>(&bytes);
        let _ = serde_json::from_slice::<RequestFrame>(&bytes);
        let _ = serde_json::from_slice::<ResponseFrame>(&bytes);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = valid_frame().to_vec();
        for (at, v) in flips {
            let i = at % bytes.len();
            bytes[i] = v;
        }
        let cut = cut % (bytes.len() + 1);
        drain::<RequestFrame>(&bytes[..cut]);
        drain::<RequestFrame>(&bytes);
    }

    #[test]
    fn length_prefix_is_bounded(len in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(tail);
        let mut c: FrameCodec<RequestFrame, RequestFrame> = FrameCodec::new(MAX);
        let mut buf = BytesMut::from(&bytes[..]);
        let r = c.decode(&mut buf);
        if len as usize > MAX {
            prop_assert!(r.is_err(), "oversized frame accepted");
        }
        // Whatever happened, nothing near `len` was reserved.
        prop_assert!(buf.capacity() <= 64 * 1024);
    }

    #[test]
    fn gid_parse_accepts_only_the_safe_alphabet(s in "\\PC{0,80}") {
        if let Ok(g) = Gid::parse(&s) {
            prop_assert!(g.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
            prop_assert!(g.as_str().len() < 200);
        }
    }
}

// Round trips: whatever a sender encodes, the receiver decodes to the same message
// (checked as: decode, then encode again, gives the very same bytes; the hand-written
// decoders of the tagged enums are where a field could be dropped or renamed).

use twopc_shared::msg::{
    AgentError, BranchOutcome, Decision, ErrorKind, Isolation, Response, StmtResult,
};

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<u64>().prop_map(|n| serde_json::json!(n)),
        (-1e300f64..1e300).prop_map(|f| serde_json::json!(f)),
        "\\PC{0,12}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map("\\PC{0,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn gid() -> impl Strategy<Value = Gid> {
    ("[a-z][a-z0-9]{0,8}", any::<u32>(), any::<u64>())
        .prop_map(|(c, e, s)| Gid::new(&c, u64::from(e), s).unwrap())
}

fn statement() -> impl Strategy<Value = Statement> {
    ("\\PC{0,40}", proptest::collection::vec(json_value(), 0..4))
        .prop_map(|(sql, params)| Statement { sql, params })
}

fn request() -> impl Strategy<Value = Request> {
    let finish = prop_oneof![
        Just(Finish::Keep),
        Just(Finish::Prepare),
        Just(Finish::Commit),
        Just(Finish::CommitDecision)
    ];
    let isolation = prop_oneof![
        Just(Isolation::ReadCommitted),
        Just(Isolation::RepeatableRead),
        Just(Isolation::Serializable)
    ];
    let decision = proptest::option::of(
        ("\\PC{0,10}", proptest::collection::vec("[a-z]{1,5}", 0..3)).prop_map(
            |(txn_id, participants)| Decision {
                txn_id,
                participants,
            },
        ),
    );
    let execute = (
        gid(),
        isolation,
        proptest::collection::vec(statement(), 0..4),
        finish,
        any::<(bool, bool)>(),
        decision,
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(
                gid,
                isolation,
                statements,
                finish,
                (read_only_vote, continues),
                decision,
                expires_in_ms,
            )| {
                Request::Execute(ExecuteBranch {
                    gid,
                    isolation,
                    statements,
                    finish,
                    read_only_vote,
                    continues,
                    decision,
                    expires_in_ms,
                })
            },
        );
    prop_oneof![
        (
            "[a-z0-9]{1,10}",
            any::<u32>(),
            any::<u64>(),
            proptest::option::of("[0-9a-f]{64}")
        )
            .prop_map(
                |(coordinator_id, protocol_version, epoch, nonce)| Request::Hello {
                    protocol_version,
                    coordinator_id,
                    epoch,
                    nonce
                }
            ),
        "[0-9a-f]{64}".prop_map(|proof| Request::Authenticate { proof }),
        execute,
        gid().prop_map(|gid| Request::CommitPrepared { gid }),
        gid().prop_map(|gid| Request::Abort { gid }),
        gid().prop_map(|gid| Request::Fence { gid }),
        proptest::collection::vec(gid(), 0..4).prop_map(|gids| Request::Forget { gids }),
        "[a-z0-9_]{1,12}".prop_map(|gid_prefix| Request::ListPrepared { gid_prefix }),
        "[a-z0-9_]{1,12}".prop_map(|gid_prefix| Request::ListDecisions { gid_prefix }),
        Just(Request::Ping),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    let kind = proptest::sample::select(vec![
        ErrorKind::Sql,
        ErrorKind::BadParam,
        ErrorKind::BadRequest,
        ErrorKind::UnknownBranch,
        ErrorKind::Limit,
        ErrorKind::Timeout,
        ErrorKind::Unavailable,
        ErrorKind::DatabaseUnreachable,
        ErrorKind::VersionMismatch,
        ErrorKind::Fenced,
        ErrorKind::Unauthenticated,
        ErrorKind::Forbidden,
        ErrorKind::EpochOutOfRange,
        ErrorKind::Internal,
    ]);
    let outcome = proptest::sample::select(vec![
        BranchOutcome::Active,
        BranchOutcome::Prepared,
        BranchOutcome::ReadOnly,
        BranchOutcome::Committed,
    ]);
    let row = proptest::collection::btree_map("\\PC{0,6}", json_value(), 0..4)
        .prop_map(|m| m.into_iter().collect::<serde_json::Map<_, _>>());
    let result = (
        any::<u64>(),
        proptest::collection::vec(row, 0..3),
        proptest::option::of("\\PC{0,12}"),
    )
        .prop_map(|(rows_affected, rows, error)| StmtResult {
            rows_affected,
            rows,
            error,
        });
    prop_oneof![
        Just(Response::Pong),
        Just(Response::Aborted),
        "[0-9a-f]{64}".prop_map(|nonce| Response::Challenge { nonce }),
        (proptest::collection::vec(result, 0..3), outcome)
            .prop_map(|(results, outcome)| Response::Executed { results, outcome }),
        (
            kind,
            proptest::option::of("[0-9A-Z]{5}"),
            "\\PC{0,30}",
            proptest::option::of(0usize..100)
        )
            .prop_map(|(kind, sqlstate, message, statement_index)| {
                Response::Failed(AgentError {
                    kind,
                    sqlstate,
                    message,
                    statement_index,
                })
            }),
        (
            any::<bool>(),
            "\\PC{0,10}",
            proptest::collection::vec("[a-z]{1,5}", 0..3)
        )
            .prop_map(|(committed, txn_id, participants)| Response::Decision {
                committed,
                txn_id,
                participants
            }),
        any::<u64>().prop_map(|rows| Response::Forgotten { rows }),
    ]
}

/// Encodes `frame`, decodes it as `T`, encodes that: the two encodings must be equal.
fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(frame: &T) -> (Vec<u8>, Vec<u8>) {
    let first = twopc_shared::codec::encode_payload(frame, usize::MAX).unwrap();
    let decoded: T = serde_json::from_slice(&first).expect("a frame we encoded does not decode");
    let second = twopc_shared::codec::encode_payload(&decoded, usize::MAX).unwrap();
    (first.to_vec(), second.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn every_request_round_trips(id in any::<u64>(), timeout_ms in any::<u64>(), body in request()) {
        let (first, second) = round_trip(&RequestFrame { id, timeout_ms, body });
        prop_assert_eq!(first, second);
    }

    #[test]
    fn every_response_round_trips(id in any::<u64>(), body in response()) {
        let (first, second) = round_trip(&ResponseFrame { id, body });
        prop_assert_eq!(first, second);
    }

    /// GIDs the coordinator makes parse back to what made them; the same strings with
    /// a byte outside the alphabet do not parse.
    #[test]
    fn gids_round_trip_and_a_bad_byte_is_refused(
        c in "[a-z][a-z0-9]{0,8}",
        epoch in any::<u32>(),
        seq in any::<u64>(),
        at in any::<usize>(),
        bad in "[^A-Za-z0-9_]",
    ) {
        let g = Gid::new(&c, u64::from(epoch), seq).unwrap();
        prop_assert!(g.as_str().starts_with("twopc_"));
        let back = Gid::parse(g.as_str()).unwrap();
        prop_assert_eq!(back.coordinator_id(), c.as_str());
        prop_assert_eq!(back.epoch(), u64::from(epoch));
        prop_assert_eq!(back.seq(), seq);
        let mut s = g.as_str().to_owned();
        let i = at % (s.len() + 1);
        s.insert_str(i, &bad);
        prop_assert!(Gid::parse(&s).is_err(), "{} parsed", s);
    }
}
