//! What a client statement is, judged by its leading keywords (after whitespace and
//! comments). A statement sent through the extended protocol holds one command, so its
//! first words name it.

/// Longest word kept; a longer one reads as `#`, which matches no keyword.
const WORD_MAX: usize = 16;

/// A leading word, lowercased, kept on the stack: statements are checked on every
/// request, so this allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct Word {
    buf: [u8; WORD_MAX],
    len: usize,
}

impl Word {
    fn new(word: &str) -> Word {
        let mut buf = [b'#'; WORD_MAX];
        if word.len() > WORD_MAX {
            return Word { buf, len: 1 };
        }
        for (b, c) in buf.iter_mut().zip(word.bytes()) {
            *b = c.to_ascii_lowercase();
        }
        Word {
            buf,
            len: word.len(),
        }
    }

    pub fn as_str(&self) -> &str {
        // ASCII letters or '#' only.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("#")
    }
}

/// The first `N` words of `sql` (runs of ASCII letters), lowercased, skipping leading
/// whitespace, `--` line comments and `/* */` block comments; `None` past the last.
pub fn leading_words<const N: usize>(sql: &str) -> [Option<Word>; N] {
    let mut words = [None; N];
    let mut found = 0;
    let mut rest = sql;
    // Bounded: every pass consumes at least one character or stops.
    while found < N {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, after)| after);
        } else {
            let end = rest
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(rest.len());
            if end == 0 {
                break;
            }
            words[found] = Some(Word::new(&rest[..end]));
            found += 1;
            rest = &rest[end..];
        }
    }
    words
}

fn word_str(w: &Option<Word>) -> Option<&str> {
    w.as_ref().map(Word::as_str)
}

/// Whether `sql` begins with INSERT, UPDATE, DELETE or MERGE.
pub fn starts_with_dml(sql: &str) -> bool {
    let [first] = leading_words::<1>(sql);
    matches!(
        word_str(&first),
        Some("insert" | "update" | "delete" | "merge")
    )
}

/// If `sql` ends, starts or prepares a transaction, what it is. The agent owns each
/// branch's transaction: a client `COMMIT` would commit the branch's work on its own,
/// after which `PREPARE TRANSACTION` only warns ("no transaction in progress") and the
/// branch would vote yes with nothing prepared: atomicity lost. Savepoints
/// (`SAVEPOINT`, `RELEASE`, `ROLLBACK TO`) stay inside the transaction and are allowed.
pub fn transaction_control(sql: &str) -> Option<&'static str> {
    let [first, second] = leading_words::<2>(sql);
    match (word_str(&first)?, word_str(&second)) {
        ("begin", _) | ("start", _) => Some("BEGIN/START TRANSACTION"),
        ("commit", _) | ("end", _) => Some("COMMIT"),
        ("abort", _) => Some("ROLLBACK"),
        ("rollback", Some("to")) => None,
        ("rollback", _) => Some("ROLLBACK"),
        ("prepare", Some("transaction")) => Some("PREPARE TRANSACTION"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words<const N: usize>(sql: &str) -> Vec<String> {
        leading_words::<N>(sql)
            .iter()
            .flatten()
            .map(|w| w.as_str().to_owned())
            .collect()
    }

    #[test]
    fn leading_words_skip_whitespace_and_comments() {
        assert_eq!(
            words::<3>("  -- x\n /* y */ Rollback\tTO s"),
            vec!["rollback", "to", "s"]
        );
        assert_eq!(words::<2>("/* never closed"), Vec::<String>::new());
        assert_eq!(words::<2>(""), Vec::<String>::new());
        assert_eq!(words::<1>("(SELECT 1)"), Vec::<String>::new());
        assert_eq!(words::<2>("SELECT x"), vec!["select", "x"]);
        assert_eq!(
            words::<1>("transactiontransaction"),
            vec!["#"],
            "longer than any keyword: matches none"
        );
        assert_eq!(words::<1>("abcdefghijklmnop"), vec!["abcdefghijklmnop"]);
    }

    #[test]
    fn dml_is_recognized() {
        for yes in [
            "INSERT INTO t VALUES (1)",
            "  update t set x = 1",
            "-- c\nDELETE FROM t",
            "/* c */ merge into t using s on true when matched then do nothing",
        ] {
            assert!(starts_with_dml(yes), "{yes}");
        }
        for no in [
            "SELECT 1",
            "WITH x AS (DELETE FROM t) SELECT 1",
            "insertx",
            "",
            "-- only a comment",
            "updated_at",
        ] {
            assert!(!starts_with_dml(no), "{no}");
        }
    }

    #[test]
    fn transaction_control_is_refused_and_savepoints_are_not() {
        for bad in [
            "COMMIT",
            "commit;",
            "  /* sneaky */ Commit Work",
            "END",
            "ROLLBACK",
            "abort",
            "BEGIN",
            "start transaction",
            "PREPARE TRANSACTION 'x'",
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
        ] {
            assert!(transaction_control(bad).is_some(), "{bad}");
        }
        for ok in [
            "SAVEPOINT a",
            "RELEASE SAVEPOINT a",
            "ROLLBACK TO SAVEPOINT a",
            "rollback to a",
            "PREPARE q AS SELECT 1",
            "SELECT 'COMMIT'",
            "UPDATE t SET endpoint = 1",
            "committed_at_check()",
            "",
        ] {
            assert!(transaction_control(ok).is_none(), "{ok}");
        }
    }
}
