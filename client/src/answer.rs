//! An answer, classified once, and the one retry rule over it.

use serde::Deserialize;
use twopc_shared::msg::StmtResult;

use crate::types::{Committed, Outcome, Status};
use crate::Error;

/// What one request's answer means for the transaction.
#[derive(Debug)]
pub enum Answer {
    Committed(Committed),
    Begun,
    Statement(StmtResult),
    RolledBack,
    Status(Status),
    /// The transaction aborted.
    Aborted {
        participant: Option<String>,
        code: Option<String>,
        message: String,
    },
    /// Bad input or a refusal: nothing ran, and sending it again will not help.
    Refused {
        status: u16,
        message: String,
    },
    /// Refused for now (429, 503): nothing ran for this request.
    Busy {
        status: u16,
        message: String,
    },
    /// Another attempt of the txn id is running or in doubt (409).
    Conflict {
        message: String,
    },
    /// Not connected: the request never reached the coordinator.
    Unreachable(reqwest::Error),
    /// The request may have run and its answer is lost (timeout, cut connection, 504,
    /// another 5xx).
    Lost(String),
    /// An answer that fits nothing above.
    Unexpected {
        status: u16,
        body: String,
    },
}

/// The kind of answer a request wants: a 200 is read as that kind (the shapes overlap:
/// a rollback's answer and a presumed abort's status are both `{txn_id, outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A one-shot transaction, a begin, or a commit: `Committed` (or 201 for a begin).
    Committed,
    Statement,
    RolledBack,
    Status,
}

/// What to do after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It is the answer (success or a final error).
    Done,
    /// Wait, then send the same request again.
    Wait,
    /// Ask `GET` for the outcome before anything else.
    Ask,
}

/// The retry rule. `retry_left`: another send is allowed.
pub fn next_step(answer: &Answer, retry_left: bool) -> Step {
    match answer {
        Answer::Busy { .. } | Answer::Unreachable(_) if retry_left => Step::Wait,
        Answer::Lost(_) | Answer::Conflict { .. } => Step::Ask,
        _ => Step::Done,
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: String,
    participant: Option<String>,
    code: Option<String>,
}

#[derive(Deserialize)]
struct OutcomeOnly {
    outcome: Option<Outcome>,
}

impl Answer {
    pub(crate) fn from_transport(e: reqwest::Error) -> Answer {
        // A connect error happens before a byte of the request is sent.
        if e.is_connect() {
            Answer::Unreachable(e)
        } else {
            Answer::Lost(e.to_string())
        }
    }

    /// Classifies a status and body, a 200 as the `expect`ed kind.
    pub fn classify(status: u16, body: &[u8], expect: Expect) -> Answer {
        let unexpected = || Answer::Unexpected {
            status,
            body: String::from_utf8_lossy(body).chars().take(500).collect(),
        };
        let outcome = serde_json::from_slice::<OutcomeOnly>(body)
            .ok()
            .and_then(|o| o.outcome);
        let coordinator_error = serde_json::from_slice::<ErrorBody>(body).ok();
        let message = || match &coordinator_error {
            Some(e) => e.error.message.clone(),
            None => String::from_utf8_lossy(body).chars().take(500).collect(),
        };
        match status {
            200 => Self::ok(body, expect).unwrap_or_else(unexpected),
            201 => Answer::Begun,
            400 | 409 if outcome == Some(Outcome::Aborted) => {
                match serde_json::from_slice::<ErrorBody>(body) {
                    Ok(e) => Answer::Aborted {
                        participant: e.error.participant,
                        code: e.error.code,
                        message: e.error.message,
                    },
                    Err(_) => unexpected(),
                }
            }
            409 => Answer::Conflict { message: message() },
            // The coordinator's own refusal ran nothing; a proxy's 503 (no such body)
            // may have come after it forwarded the request.
            429 | 503 if coordinator_error.is_some() => Answer::Busy {
                status,
                message: message(),
            },
            503 => Answer::Lost(format!("{status}: {}", message())),
            400..=499 => Answer::Refused {
                status,
                message: message(),
            },
            500..=599 => Answer::Lost(format!("{status}: {}", message())),
            _ => unexpected(),
        }
    }

    /// A 200 read as the kind wanted.
    fn ok(body: &[u8], expect: Expect) -> Option<Answer> {
        Some(match expect {
            Expect::Committed => Answer::Committed(serde_json::from_slice(body).ok()?),
            Expect::Statement => Answer::Statement(serde_json::from_slice(body).ok()?),
            Expect::Status => Answer::Status(serde_json::from_slice(body).ok()?),
            Expect::RolledBack => {
                let o: OutcomeOnly = serde_json::from_slice(body).ok()?;
                (o.outcome == Some(Outcome::Aborted)).then_some(Answer::RolledBack)?
            }
        })
    }

    /// The final answer of a commit.
    pub(crate) fn into_result(self, txn_id: &str) -> Result<Committed, Error> {
        match self {
            Answer::Committed(c) => Ok(c),
            other => Err(other.into_error(txn_id)),
        }
    }

    /// The error an answer that is not the one wanted stands for.
    pub(crate) fn into_error(self, txn_id: &str) -> Error {
        let txn_id = txn_id.to_owned();
        match self {
            Answer::Aborted {
                participant,
                code,
                message,
            } => Error::Aborted {
                txn_id,
                participant,
                code,
                message,
            },
            Answer::Refused { status, message } => Error::Refused { status, message },
            Answer::Conflict { message } => Error::Refused {
                status: 409,
                message,
            },
            Answer::Busy { status, message } => Error::Unavailable { status, message },
            Answer::Unreachable(e) => Error::Transport(e),
            Answer::Lost(message) => Error::OutcomeUnknown { txn_id, message },
            Answer::Unexpected { status, body } => Error::Protocol { status, body },
            a @ (Answer::Committed(_)
            | Answer::Begun
            | Answer::Statement(_)
            | Answer::RolledBack
            | Answer::Status(_)) => Error::Protocol {
                status: 200,
                body: format!("an answer of another kind: {a:?}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, body: serde_json::Value) -> Answer {
        let expect = if body.get("rows_affected").is_some() {
            Expect::Statement
        } else {
            Expect::Committed
        };
        Answer::classify(status, body.to_string().as_bytes(), expect)
    }

    #[test]
    fn answers_are_told_apart() {
        let c = classify(
            200,
            serde_json::json!({"txn_id": "t", "outcome": "committed", "branches": []}),
        );
        assert!(matches!(c, Answer::Committed(_)), "{c:?}");
        // A rollback's answer and a presumed abort's status have the same shape: what
        // was asked decides (found by review: a presumed abort read as a rollback).
        let body = br#"{"txn_id": "t", "outcome": "aborted"}"#;
        let r = Answer::classify(200, body, Expect::RolledBack);
        assert!(matches!(r, Answer::RolledBack), "{r:?}");
        let s = Answer::classify(200, body, Expect::Status);
        assert!(
            matches!(
                s,
                Answer::Status(Status {
                    outcome: Some(Outcome::Aborted),
                    ..
                })
            ),
            "{s:?}"
        );
        let s = Answer::classify(
            200,
            br#"{"txn_id": "t", "state": "in_doubt"}"#,
            Expect::Status,
        );
        assert!(matches!(s, Answer::Status(_)), "{s:?}");
        let st = classify(200, serde_json::json!({"rows_affected": 1, "rows": []}));
        assert!(matches!(st, Answer::Statement(_)), "{st:?}");
        let a = classify(
            409,
            serde_json::json!({"txn_id": "t", "outcome": "aborted",
                "error": {"participant": "a", "code": "23514", "message": "check"}}),
        );
        assert!(
            matches!(a, Answer::Aborted { ref code, .. } if code.as_deref() == Some("23514")),
            "{a:?}"
        );
        let c = classify(
            409,
            serde_json::json!({"error": {"message": "still running"}}),
        );
        assert!(matches!(c, Answer::Conflict { .. }), "{c:?}");
        let u = classify(
            504,
            serde_json::json!({"txn_id": "t", "outcome": "unknown", "gid": "g", "error": {"message": "x"}}),
        );
        assert!(matches!(u, Answer::Lost(_)), "{u:?}");
        let b = classify(
            503,
            serde_json::json!({"error": {"message": "shutting down"}}),
        );
        assert!(matches!(b, Answer::Busy { status: 503, .. }), "{b:?}");
        // A proxy's 503 is no proof that nothing ran.
        let p = Answer::classify(503, b"upstream gone", Expect::Committed);
        assert!(matches!(p, Answer::Lost(_)), "{p:?}");
        let bad = classify(400, serde_json::json!({"error": {"message": "malformed"}}));
        assert!(
            matches!(bad, Answer::Refused { status: 400, .. }),
            "{bad:?}"
        );
    }

    /// The rule: only a refusal that ran nothing is sent again blindly; a lost answer
    /// or a concurrent attempt is asked about first; everything else is final.
    #[test]
    fn the_retry_rule() {
        let busy = Answer::Busy {
            status: 429,
            message: String::new(),
        };
        assert_eq!(next_step(&busy, true), Step::Wait);
        assert_eq!(next_step(&busy, false), Step::Done);
        let lost = Answer::Lost("timeout".into());
        assert_eq!(next_step(&lost, true), Step::Ask);
        assert_eq!(
            next_step(&lost, false),
            Step::Ask,
            "a lost answer is always asked about"
        );
        let conflict = Answer::Conflict {
            message: String::new(),
        };
        assert_eq!(next_step(&conflict, true), Step::Ask);
        let aborted = Answer::Aborted {
            participant: None,
            code: None,
            message: String::new(),
        };
        assert_eq!(next_step(&aborted, true), Step::Done);
        let refused = Answer::Refused {
            status: 400,
            message: String::new(),
        };
        assert_eq!(next_step(&refused, true), Step::Done);
    }
}
