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
