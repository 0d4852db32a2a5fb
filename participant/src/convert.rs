//! JSON ↔ PostgreSQL values.
//!
//! Parameters: a JSON value is checked against the type PostgreSQL reports for its `$n`
//! ([`check_params`]) before anything runs, then bound in TEXT format ([`JsonParam`]), so
//! PostgreSQL itself parses it with the exact semantics of the type (numeric precision,
//! timestamp formats, ...).
//!
//! Rows: see [`crate::decode`].

use std::error::Error as StdError;

use bytes::BytesMut;
use postgres_types::{Format, FromSql, IsNull, Kind, ToSql, Type};
use serde_json::Value;

type BoxError = Box<dyn StdError + Sync + Send>;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("parameter ${index}: {message}")]
    Param { index: usize, message: String },
    #[error("parameter count mismatch: statement takes {expected}, got {got}")]
    ParamCount { expected: usize, got: usize },
    #[error("column {column}: {message}")]
    Decode { column: String, message: String },
    #[error(
        "column {column}: the value nests arrays and objects deeper than {max} levels (cast \
         it, e.g. {column}::text)"
    )]
    TooDeep { column: String, max: usize },
}

/// A JSON value bound to a parameter, sent as text for PostgreSQL to parse.
#[derive(Debug)]
pub struct JsonParam<'a>(pub &'a Value);

impl ToSql for JsonParam<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        if self.0.is_null() {
            return Ok(IsNull::Yes);
        }
        out.extend_from_slice(text_form(ty, self.0)?.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    postgres_types::to_sql_checked!();
}

/// The text a non-null JSON value gives the input function of `ty`: strings as they
/// are, numbers and booleans as JSON prints them, an array bound to an array type as an
/// array literal (`{"a","b",NULL}`), an object bound to a composite type as a record
/// literal in field order (`("1","x y",)`, a missing field NULL); any other array or
/// object as its JSON text (json, jsonb).
fn text_form(ty: &Type, v: &Value) -> Result<String, String> {
    Ok(match (v, ty.kind()) {
        (Value::String(s), _) => s.clone(),
        (Value::Bool(b), _) => b.to_string(),
        (Value::Number(n), _) => n.to_string(),
        (Value::Null, _) => String::new(),
        (_, Kind::Domain(base)) => text_form(base, v)?,
        (Value::Array(items), Kind::Array(elem))
            if *ty != Type::JSON_ARRAY && *ty != Type::JSONB_ARRAY =>
        {
            array_literal(elem, items)?
        }
        (Value::Object(fields), Kind::Composite(declared)) => record_literal(declared, fields)?,
        (other, _) => other.to_string(),
    })
}

/// `text` in double quotes, `"` and `\` escaped (array and record literals alike).
fn quoted(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 2);
    s.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

fn array_literal(elem: &Type, items: &[Value]) -> Result<String, String> {
    let mut s = String::from("{");
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        match v {
            Value::Null => s.push_str("NULL"),
            // A nested array is the next dimension (PostgreSQL's arrays are rectangular).
            Value::Array(inner) if !matches!(elem.kind(), Kind::Array(_)) => {
                s.push_str(&array_literal(elem, inner)?)
            }
            other => s.push_str(&quoted(&text_form(elem, other)?)),
        }
    }
    s.push('}');
    Ok(s)
}

fn record_literal(
    declared: &[postgres_types::Field],
    given: &serde_json::Map<String, Value>,
) -> Result<String, String> {
    if let Some(unknown) = given
        .keys()
        .find(|k| !declared.iter().any(|f| f.name() == k.as_str()))
    {
        return Err(format!("the composite type has no field {unknown:?}"));
    }
    let mut s = String::from("(");
    for (i, f) in declared.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        match given.get(f.name()) {
            None | Some(Value::Null) => {}
            Some(v) => s.push_str(&quoted(&text_form(f.type_(), v)?)),
        }
    }
    s.push(')');
    Ok(s)
}

fn describe(v: &Value) -> String {
    let text = v.to_string();
    let short: String = text.chars().take(40).collect();
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if short.len() < text.len() {
        format!("{kind} {short}...")
    } else {
        format!("{kind} {short}")
    }
}

fn int_fits(v: &Value, min: i64, max: i64) -> bool {
    let n = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    n.is_some_and(|n| (min..=max).contains(&n))
}

fn is_numeric_text(s: &str) -> bool {
    let s = s.trim();
    if matches!(
        s.to_ascii_lowercase().as_str(),
        "nan" | "infinity" | "-infinity" | "+infinity" | "inf" | "-inf"
    ) {
        return true;
    }
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((a, b)) => (a, b),
        None => (mantissa, ""),
    };
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = (!int.is_empty() || !frac.is_empty()) && digits(int) && digits(frac);
    let exp_ok = exp.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exp_ok
}

/// Checks `params` against the statement's parameter types before anything runs.
pub fn check_params(types: &[Type], params: &[Value]) -> Result<(), ConvertError> {
    if types.len() != params.len() {
        return Err(ConvertError::ParamCount {
            expected: types.len(),
            got: params.len(),
        });
    }
    for (i, (ty, v)) in types.iter().zip(params).enumerate() {
        if v.is_null() {
            continue;
        }
        let ok = match *ty {
            Type::BOOL => {
                v.is_boolean() || matches!(v.as_str(), Some("true" | "false" | "t" | "f"))
            }
            Type::INT2 => int_fits(v, i16::MIN as i64, i16::MAX as i64),
            Type::INT4 => int_fits(v, i32::MIN as i64, i32::MAX as i64),
            Type::INT8 | Type::OID => int_fits(v, i64::MIN, i64::MAX),
            Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => match v {
                Value::Number(_) => true,
                Value::String(s) => is_numeric_text(s),
                _ => false,
            },
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::CHAR => {
                matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
            }
            Type::JSON | Type::JSONB => true,
            Type::UUID => v
                .as_str()
                .is_some_and(|s| uuid::Uuid::parse_str(s.trim()).is_ok()),
            Type::BYTEA => v.is_string(),
            _ => match ty.kind() {
                // The literal is built now so a value that cannot become one (an object
                // naming a field the type lacks) is refused before anything runs.
                Kind::Array(_) if v.is_object() => false,
                Kind::Array(_) | Kind::Composite(_) | Kind::Domain(_)
                    if v.is_array() || v.is_object() =>
                {
                    if let Err(message) = text_form(ty, v) {
                        return Err(ConvertError::Param {
                            index: i + 1,
                            message,
                        });
                    }
                    true
                }
                Kind::Array(_) => v.is_string(),
                _ => v.is_string() || v.is_number() || v.is_boolean(),
            },
        };
        if !ok {
            return Err(ConvertError::Param {
                index: i + 1,
                message: format!("expected {}, got {}", ty.name(), describe(v)),
            });
        }
    }
    Ok(())
}

/// PostgreSQL's binary `numeric`, kept as its exact decimal text.
pub(crate) struct PgNumeric(pub(crate) String);

impl<'a> FromSql<'a> for PgNumeric {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let u16_at = |i: usize| -> Result<u16, BoxError> {
            raw.get(i..i + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or_else(|| "numeric: short input".into())
        };
        let ndigits = u16_at(0)? as usize;
        let weight = u16_at(2)? as i16 as i32;
        let sign = u16_at(4)?;
        let dscale = u16_at(6)? as usize;
        match sign {
            0xC000 => return Ok(PgNumeric("NaN".into())),
            0xD000 => return Ok(PgNumeric("Infinity".into())),
            0xF000 => return Ok(PgNumeric("-Infinity".into())),
            0x0000 | 0x4000 => {}
            other => return Err(format!("numeric: bad sign {other:#x}").into()),
        }
        if raw.len() != 8 + 2 * ndigits {
            return Err("numeric: length does not match digit count".into());
        }
        let mut digits = Vec::with_capacity(ndigits);
        for k in 0..ndigits {
            let d = u16_at(8 + 2 * k)?;
            if d >= 10_000 {
                return Err("numeric: digit out of range".into());
            }
            digits.push(d);
        }
        let digit = |idx: i32| -> u16 {
            if idx >= 0 && (idx as usize) < digits.len() {
                digits[idx as usize]
            } else {
                0
            }
        };
        let mut s = String::new();
        if sign == 0x4000 {
            s.push('-');
        }
        // Integer part: base-10000 digits with weights weight..=0.
        if weight < 0 {
            s.push('0');
        } else {
            for w in 0..=weight {
                let d = digit(w);
                if w == 0 {
                    s.push_str(&d.to_string());
                } else {
                    s.push_str(&format!("{d:04}"));
                }
            }
        }
        if dscale > 0 {
            s.push('.');
            let mut frac = String::new();
            let mut idx = weight + 1;
            while frac.len() < dscale {
                frac.push_str(&format!("{:04}", digit(idx)));
                idx += 1;
            }
            frac.truncate(dscale);
            s.push_str(&frac);
        }
        Ok(PgNumeric(s))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_that_fit() {
        let types = [
            Type::INT4,
            Type::INT8,
            Type::BOOL,
            Type::NUMERIC,
            Type::TEXT,
            Type::JSONB,
            Type::UUID,
            Type::FLOAT8,
            Type::TIMESTAMPTZ,
        ];
        let params = [
            json!(5),
            json!("9007199254740993"),
            json!(true),
            json!("12345678901234567890.000001"),
            json!("x"),
            json!({"a": [1]}),
            json!("67e55044-10b1-426f-9247-bb680e5fe0c8"),
            json!(1.5),
            json!("2024-01-02 03:04:05+00"),
        ];
        check_params(&types, &params).unwrap();
        check_params(&[Type::INT4], &[Value::Null]).unwrap();
    }

    #[test]
    fn params_that_do_not_fit_name_index_and_type() {
        let cases = [
            (Type::INT4, json!("abc")),
            (Type::INT4, json!(3.5)),
            (Type::INT4, json!(1u64 << 40)),
            (Type::INT2, json!(40000)),
            (Type::BOOL, json!(1)),
            (Type::NUMERIC, json!("12a")),
            (Type::TEXT, json!({})),
            (Type::UUID, json!("not-a-uuid")),
            (Type::FLOAT8, json!([1])),
        ];
        for (ty, v) in cases {
            let err = check_params(&[Type::TEXT, ty.clone()], &[json!("ok"), v.clone()])
                .expect_err(&format!("{ty} accepted {v}"));
            let msg = err.to_string();
            assert!(msg.contains("$2"), "{msg}");
            assert!(msg.contains(ty.name()), "{msg}");
        }
        // An object is no array (it would bind as a one-element array `{"x":"y"}`).
        assert!(check_params(&[Type::INT4_ARRAY], &[json!({"x": "y"})]).is_err());
        assert!(check_params(&[Type::INT4_ARRAY], &[json!([1, 2])]).is_ok());
        assert!(matches!(
            check_params(&[Type::INT4], &[]),
            Err(ConvertError::ParamCount {
                expected: 1,
                got: 0
            })
        ));
    }

    #[test]
    fn numeric_text_syntax() {
        for ok in [
            "0", "-1", "1.", ".5", "1e10", "-1.5E-3", "NaN", "Infinity", " 7 ",
        ] {
            assert!(is_numeric_text(ok), "{ok}");
        }
        for bad in ["", "-", ".", "1e", "1.2.3", "abc", "1e+"] {
            assert!(!is_numeric_text(bad), "{bad}");
        }
    }

    fn numeric_bytes(ndigits: &[u16], weight: i16, sign: u16, dscale: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(ndigits.len() as u16).to_be_bytes());
        b.extend_from_slice(&weight.to_be_bytes());
        b.extend_from_slice(&sign.to_be_bytes());
        b.extend_from_slice(&dscale.to_be_bytes());
        for d in ndigits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    #[test]
    fn numeric_decoding() {
        let dec = |b: Vec<u8>| PgNumeric::from_sql(&Type::NUMERIC, &b).unwrap().0;
        assert_eq!(dec(numeric_bytes(&[], 0, 0, 0)), "0");
        assert_eq!(dec(numeric_bytes(&[], 0, 0, 2)), "0.00");
        assert_eq!(dec(numeric_bytes(&[1], 1, 0, 0)), "10000");
        assert_eq!(dec(numeric_bytes(&[5000], -1, 0x4000, 1)), "-0.5");
        assert_eq!(dec(numeric_bytes(&[1], -1, 0, 4)), "0.0001");
        assert_eq!(dec(numeric_bytes(&[12, 3456, 7800], 1, 0, 2)), "123456.78");
        assert_eq!(dec(numeric_bytes(&[], 0, 0xC000, 0)), "NaN");
        assert!(PgNumeric::from_sql(&Type::NUMERIC, &[0, 1]).is_err());
        assert!(PgNumeric::from_sql(&Type::NUMERIC, &numeric_bytes(&[10000], 0, 0, 0)).is_err());
    }

    #[test]
    fn array_literals_escape() {
        assert_eq!(
            array_literal(&Type::TEXT, &[json!("a\"b"), Value::Null, json!(3)]).unwrap(),
            r#"{"a\"b",NULL,"3"}"#
        );
        assert_eq!(
            array_literal(&Type::INT4, &[json!([1, 2]), json!([3, null])]).unwrap(),
            r#"{{"1","2"},{"3",NULL}}"#
        );
    }
}
