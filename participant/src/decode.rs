//! Result rows → JSON, every type.
//!
//! A statement's columns get a [`Plan`] before it runs: the key each column has in the
//! row object (duplicate names renamed, see [`column_keys`]) and a [`Decoder`] chosen from
//! the column's type. Values arrive in PostgreSQL's binary format. The common types have
//! a JSON form decoded here (see README, "Values"); every other type is shown as
//! PostgreSQL's own text output, asked of the server ([`resolve_pending`]): nothing a user
//! can store is unreadable, and nothing is dropped.

use std::error::Error as StdError;

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDate, NaiveDateTime, NaiveTime};
use postgres_types::{FromSql, IsNull, Kind, ToSql, Type};
use serde_json::{Map, Number, Value};

use crate::convert::PgNumeric;

type BoxError = Box<dyn StdError + Sync + Send>;

/// Largest integer a JSON number carries exactly in common clients (2^53).
const JSON_SAFE_INT: i64 = 1 << 53;
/// Server text conversions in flight at once (they are pipelined on the session).
const PENDING_IN_FLIGHT: usize = 64;
/// Nesting of arrays and composites the decoder follows (PostgreSQL allows 6 array
/// dimensions; composites of composites are bounded here).
const MAX_NESTING: usize = 32;

/// How one column's (or field's, or element's) binary values become JSON.
#[derive(Debug, Clone)]
pub enum Decoder {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    /// text, varchar, bpchar, name, enums: the bytes are the text.
    Text,
    /// `"char"`: one byte.
    Char,
    Json,
    Jsonb,
    Uuid,
    Bytea,
    Timestamp,
    Timestamptz,
    Date,
    Time,
    Void,
    /// Nested JSON arrays, one level per dimension. Elements by this decoder, or (None:
    /// `anyarray` columns) by the element type the value names.
    Array(Option<Box<Decoder>>, Type),
    /// An object, field name → value.
    /// Fields: name, the type's OID as planned, and decoder.
    Composite(Vec<(String, u32, Decoder)>, Type),
    /// An anonymous record (`ROW(...)`): an array of its field values.
    Record,
    /// PostgreSQL's text output of the value.
    Server(Type),
}

impl Decoder {
    /// The decoder for values of `ty`.
    pub fn for_type(ty: &Type) -> Decoder {
        Decoder::for_type_at(ty, 0)
    }

    fn for_type_at(ty: &Type, depth: usize) -> Decoder {
        if depth > MAX_NESTING {
            return Decoder::Server(ty.clone());
        }
        match *ty {
            Type::BOOL => Decoder::Bool,
            Type::INT2 => Decoder::Int2,
            Type::INT4 => Decoder::Int4,
            Type::INT8 => Decoder::Int8,
            Type::OID => Decoder::Oid,
            Type::FLOAT4 => Decoder::Float4,
            Type::FLOAT8 => Decoder::Float8,
            Type::NUMERIC => Decoder::Numeric,
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Decoder::Text,
            Type::CHAR => Decoder::Char,
            Type::JSON => Decoder::Json,
            Type::JSONB => Decoder::Jsonb,
            Type::UUID => Decoder::Uuid,
            Type::BYTEA => Decoder::Bytea,
            Type::TIMESTAMP => Decoder::Timestamp,
            Type::TIMESTAMPTZ => Decoder::Timestamptz,
            Type::DATE => Decoder::Date,
            Type::TIME => Decoder::Time,
            Type::VOID => Decoder::Void,
            Type::RECORD => Decoder::Record,
            Type::ANYARRAY => Decoder::Array(None, ty.clone()),
            _ => match ty.kind() {
                Kind::Enum(_) => Decoder::Text,
                Kind::Domain(base) => Decoder::for_type_at(base, depth + 1),
                Kind::Array(elem) => Decoder::Array(
                    Some(Box::new(Decoder::for_type_at(elem, depth + 1))),
                    ty.clone(),
                ),
                Kind::Composite(fields) => Decoder::Composite(
                    fields
                        .iter()
                        .map(|f| {
                            (
                                f.name().to_owned(),
                                f.type_().oid(),
                                Decoder::for_type_at(f.type_(), depth + 1),
                            )
                        })
                        .collect(),
                    ty.clone(),
                ),
                _ => Decoder::Server(ty.clone()),
            },
        }
    }
}

impl Decoder {
    /// Whether every value of this type is shown as the server's text, or may be for a
    /// reason the type alone tells: a record's or an `anyarray`'s elements of a type
    /// named only by OID, a composite whose fields changed since the plan. (Rare values
    /// of other types are too: a timestamp outside years 1–9999, an array whose lower
    /// bound is not 1.)
    fn may_need_server_text(&self) -> bool {
        match self {
            Decoder::Server(_) | Decoder::Record | Decoder::Composite(..) => true,
            Decoder::Array(None, _) => true,
            Decoder::Array(Some(elem), _) => elem.may_need_server_text(),
            _ => false,
        }
    }
}

/// What a statement's rows become: each column's key in the row object and decoder.
#[derive(Debug, Clone)]
pub struct Plan {
    pub columns: Vec<(String, Decoder)>,
}

impl Plan {
    /// Whether a column's values will, or may by their type, be shown as the server's
    /// text ([`resolve_pending`]): the branch then asks for it before it finishes.
    pub fn may_need_server_text(&self) -> bool {
        self.columns.iter().any(|(_, d)| d.may_need_server_text())
    }

    pub fn new(columns: &[tokio_postgres::Column]) -> Plan {
        let names: Vec<&str> = columns.iter().map(|c| c.name()).collect();
        let keys = column_keys(&names);
        Plan {
            columns: keys
                .into_iter()
                .zip(columns)
                .map(|(k, c)| (k, Decoder::for_type(c.type_())))
                .collect(),
        }
    }
}

/// The keys of a row object: the column names, where a name seen before becomes
/// `name_2`, `name_3`, ... (the first number no column has taken), so that
/// `SELECT 1 AS x, 2 AS x` answers `{"x": 1, "x_2": 2}`: every value kept.
pub fn column_keys(names: &[&str]) -> Vec<String> {
    let mut taken: std::collections::HashSet<String> =
        names.iter().map(|n| (*n).to_owned()).collect();
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    names
        .iter()
        .map(|name| {
            if seen.insert(name) {
                return (*name).to_owned();
            }
            let mut k = 2u64;
            loop {
                let candidate = format!("{name}_{k}");
                if taken.insert(candidate.clone()) {
                    return candidate;
                }
                k += 1;
            }
        })
        .collect()
}

/// A value whose JSON is PostgreSQL's text output, still to be asked of the server:
/// where it goes in its row (a JSON pointer) and its binary value.
#[derive(Debug)]
pub struct Pending {
    pub pointer: String,
    pub ty: Type,
    pub raw: Vec<u8>,
}

/// One row as a JSON object (in column order); values that need the server's text
/// output are `null` here and listed in `pending` (relative to this row).
pub fn decode_row(
    row: &tokio_postgres::Row,
    plan: &Plan,
    pending: &mut Vec<Pending>,
) -> Result<Map<String, Value>, (usize, BoxError)> {
    let mut out = Map::with_capacity(plan.columns.len());
    for (i, (key, decoder)) in plan.columns.iter().enumerate() {
        let raw = row.try_get::<_, RawValue>(i).map_err(|e| (i, e.into()))?;
        let v = match raw.0 {
            None => Value::Null,
            Some(bytes) => {
                let mut at = Pointer::new(key);
                decode(decoder, bytes, &mut at, pending, 0).map_err(|e| (i, e))?
            }
        };
        out.insert(key.clone(), v);
    }
    Ok(out)
}

/// The bytes of a column as they came (binary format), or None for NULL.
struct RawValue<'a>(Option<&'a [u8]>);

impl<'a> FromSql<'a> for RawValue<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(RawValue(Some(raw)))
    }
    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(RawValue(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A JSON pointer being built while descending into a value.
struct Pointer(String);

impl Pointer {
    fn new(key: &str) -> Pointer {
        let mut p = Pointer(String::new());
        p.push(key);
        p
    }
    fn push(&mut self, token: &str) {
        self.0.push('/');
        for c in token.chars() {
            match c {
                '~' => self.0.push_str("~0"),
                '/' => self.0.push_str("~1"),
                c => self.0.push(c),
            }
        }
    }
    fn pop_to(&mut self, len: usize) {
        self.0.truncate(len);
    }
}

fn decode(
    d: &Decoder,
    raw: &[u8],
    at: &mut Pointer,
    pending: &mut Vec<Pending>,
    depth: usize,
) -> Result<Value, BoxError> {
    if depth > MAX_NESTING {
        return Err("the value nests deeper than the decoder follows".into());
    }
    Ok(match d {
        Decoder::Bool => Value::Bool(fixed::<1>(raw)?[0] != 0),
        Decoder::Int2 => Value::from(i16::from_be_bytes(fixed(raw)?)),
        Decoder::Int4 => Value::from(i32::from_be_bytes(fixed(raw)?)),
        Decoder::Oid => Value::from(u32::from_be_bytes(fixed(raw)?)),
        Decoder::Int8 => {
            let n = i64::from_be_bytes(fixed(raw)?);
            if (-JSON_SAFE_INT..=JSON_SAFE_INT).contains(&n) {
                Value::from(n)
            } else {
                Value::String(n.to_string())
            }
        }
        Decoder::Float4 => float_json(f32::from_be_bytes(fixed(raw)?) as f64),
        Decoder::Float8 => float_json(f64::from_be_bytes(fixed(raw)?)),
        Decoder::Numeric => Value::String(PgNumeric::from_sql(&Type::NUMERIC, raw)?.0),
        Decoder::Text => Value::String(std::str::from_utf8(raw)?.to_owned()),
        Decoder::Char => Value::String(char_text(fixed::<1>(raw)?[0])),
        Decoder::Json => serde_json::from_slice(raw)?,
        Decoder::Jsonb => match raw.split_first() {
            Some((1, rest)) => serde_json::from_slice(rest)?,
            _ => return Err("jsonb: unknown binary version".into()),
        },
        Decoder::Uuid => Value::String(uuid::Uuid::from_bytes(fixed(raw)?).to_string()),
        Decoder::Bytea => {
            let mut s = String::with_capacity(2 + 2 * raw.len());
            s.push_str("\\x");
            for byte in raw {
                s.push_str(&format!("{byte:02x}"));
            }
            Value::String(s)
        }
        Decoder::Timestamp => match timestamp_text(i64::from_be_bytes(fixed(raw)?), false) {
            Some(s) => Value::String(s),
            None => server_text(&Type::TIMESTAMP, raw, at, pending),
        },
        Decoder::Timestamptz => match timestamp_text(i64::from_be_bytes(fixed(raw)?), true) {
            Some(s) => Value::String(s),
            None => server_text(&Type::TIMESTAMPTZ, raw, at, pending),
        },
        Decoder::Date => match date_text(i32::from_be_bytes(fixed(raw)?)) {
            Some(s) => Value::String(s),
            None => server_text(&Type::DATE, raw, at, pending),
        },
        // 24:00:00 is a valid time (chrono would wrap it to midnight).
        Decoder::Time if i64::from_be_bytes(fixed(raw)?) == 86_400_000_000 => {
            Value::String("24:00:00".into())
        }
        Decoder::Time => {
            let micros = i64::from_be_bytes(fixed(raw)?);
            let t = NaiveTime::from_hms_opt(0, 0, 0).unwrap_or_default()
                + ChronoDuration::microseconds(micros);
            Value::String(strip_zero_fraction(t.format("%H:%M:%S%.6f").to_string()))
        }
        Decoder::Void => Value::Null,
        Decoder::Array(elem, ty) => return array(elem.as_deref(), ty, raw, at, pending, depth),
        Decoder::Composite(fields, ty) => {
            return composite(fields, ty, raw, at, pending, depth);
        }
        Decoder::Record => return record(raw, at, pending, depth),
        Decoder::Server(ty) => server_text(ty, raw, at, pending),
    })
}

/// `null` for now, and the value listed for the server's text output.
fn server_text(ty: &Type, raw: &[u8], at: &Pointer, pending: &mut Vec<Pending>) -> Value {
    pending.push(Pending {
        pointer: at.0.clone(),
        ty: ty.clone(),
        raw: raw.to_vec(),
    });
    Value::Null
}

fn fixed<const N: usize>(raw: &[u8]) -> Result<[u8; N], BoxError> {
    raw.try_into()
        .map_err(|_| format!("expected {N} bytes, got {}", raw.len()).into())
}

/// A big-endian i32 at `at`.
fn i32_at(raw: &[u8], at: usize) -> Result<i32, BoxError> {
    raw.get(at..at + 4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| "value ends early".into())
}

fn float_json(f: f64) -> Value {
    if f.is_nan() {
        Value::String("NaN".into())
    } else if f.is_infinite() {
        Value::String(if f > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

/// `"char"` as PostgreSQL prints it: the byte, or `\ooo` for one above 127.
fn char_text(b: u8) -> String {
    match b {
        0 => String::new(),
        1..=127 => char::from(b).to_string(),
        _ => format!("\\{b:03o}"),
    }
}

fn strip_zero_fraction(s: String) -> String {
    match s.strip_suffix(".000000") {
        Some(t) => t.to_owned(),
        None => s,
    }
}

/// PostgreSQL's epoch, 2000-01-01 00:00:00.
fn pg_epoch() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(2000, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .unwrap_or_default()
}

/// A timestamp's JSON form: RFC 3339 (`Z` for timestamptz, in UTC), `infinity` or
/// `-infinity`; None for years outside 1–9999 (RFC 3339 has none: the server's text).
fn timestamp_text(micros: i64, utc: bool) -> Option<String> {
    match micros {
        i64::MAX => return Some("infinity".into()),
        i64::MIN => return Some("-infinity".into()),
        _ => {}
    }
    let t = pg_epoch().checked_add_signed(ChronoDuration::microseconds(micros))?;
    if !(1..=9999).contains(&t.year()) {
        return None;
    }
    Some(if utc {
        DateTime::<chrono::Utc>::from_naive_utc_and_offset(t, chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    } else {
        strip_zero_fraction(t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string())
    })
}

/// A date's JSON form: `YYYY-MM-DD`, `infinity` or `-infinity`; None outside years
/// 1–9999.
fn date_text(days: i32) -> Option<String> {
    match days {
        i32::MAX => return Some("infinity".into()),
        i32::MIN => return Some("-infinity".into()),
        _ => {}
    }
    let d = pg_epoch()
        .date()
        .checked_add_signed(ChronoDuration::days(days as i64))?;
    if !(1..=9999).contains(&d.year()) {
        return None;
    }
    Some(d.format("%Y-%m-%d").to_string())
}

/// The decoder of an element or field named only by its type OID.
fn decoder_for_oid(oid: u32) -> Decoder {
    match Type::from_oid(oid) {
        Some(ty) => Decoder::for_type(&ty),
        None => Decoder::Server(Type::new(
            format!("oid {oid}"),
            oid,
            Kind::Simple,
            "pg_catalog".into(),
        )),
    }
}

/// An array: `ndim, has_null, element oid, (length, lower bound) per dimension`, then
/// each element as a length (-1: NULL) and its bytes. Nested JSON arrays when every lower
/// bound is 1; otherwise (`'[0:1]={1,2}'`) the server's text, which keeps the bounds.
fn array(
    elem: Option<&Decoder>,
    ty: &Type,
    raw: &[u8],
    at: &mut Pointer,
    pending: &mut Vec<Pending>,
    depth: usize,
) -> Result<Value, BoxError> {
    let ndim = i32_at(raw, 0)?;
    let elem_oid = i32_at(raw, 8)? as u32;
    if !(0..=6).contains(&ndim) {
        return Err(format!("array: {ndim} dimensions").into());
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    for k in 0..ndim as usize {
        let len = i32_at(raw, 12 + 8 * k)?;
        let lower = i32_at(raw, 16 + 8 * k)?;
        if len < 0 {
            return Err("array: negative dimension".into());
        }
        if lower != 1 {
            return Ok(server_text(ty, raw, at, pending));
        }
        dims.push(len as usize);
    }
    let by_oid;
    let elem = match elem {
        Some(e) => e,
        None => {
            by_oid = decoder_for_oid(elem_oid);
            &by_oid
        }
    };
    let mut offset = 12 + 8 * ndim as usize;
    if dims.is_empty() {
        return Ok(Value::Array(vec![]));
    }
    let mut walk = ArrayWalk {
        raw,
        offset: &mut offset,
        elem,
        pending,
        depth,
    };
    let v = walk.level(&dims, at)?;
    if offset != raw.len() {
        return Err("array: trailing bytes".into());
    }
    Ok(v)
}

struct ArrayWalk<'a, 'p> {
    raw: &'a [u8],
    offset: &'a mut usize,
    elem: &'a Decoder,
    pending: &'p mut Vec<Pending>,
    depth: usize,
}

impl ArrayWalk<'_, '_> {
    /// The elements of one level (`dims[0]` of them), each a level below or a value.
    fn level(&mut self, dims: &[usize], at: &mut Pointer) -> Result<Value, BoxError> {
        let mut items = Vec::with_capacity(dims[0].min(4096));
        let mark = at.0.len();
        for k in 0..dims[0] {
            at.push(&k.to_string());
            let v = if dims.len() > 1 {
                self.level(&dims[1..], at)?
            } else {
                let len = i32_at(self.raw, *self.offset)?;
                *self.offset += 4;
                if len < 0 {
                    Value::Null
                } else {
                    let end = *self.offset + len as usize;
                    let bytes = self
                        .raw
                        .get(*self.offset..end)
                        .ok_or("array: element ends early")?;
                    *self.offset = end;
                    decode(self.elem, bytes, at, self.pending, self.depth + 1)?
                }
            };
            at.pop_to(mark);
            items.push(v);
        }
        Ok(Value::Array(items))
    }
}

/// One field of a composite or record value: its type OID and bytes (None: NULL).
type Field<'a> = (u32, Option<&'a [u8]>);

/// The fields of a composite or record: a count, then per field its type OID, length
/// (-1: NULL) and bytes.
fn fields_of(raw: &[u8]) -> Result<Vec<Field<'_>>, BoxError> {
    let n = i32_at(raw, 0)?;
    if !(0..=1664).contains(&n) {
        return Err(format!("record: {n} fields").into());
    }
    let mut offset = 4;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let oid = i32_at(raw, offset)? as u32;
        let len = i32_at(raw, offset + 4)?;
        offset += 8;
        if len < 0 {
            out.push((oid, None));
            continue;
        }
        let end = offset + len as usize;
        out.push((
            oid,
            Some(raw.get(offset..end).ok_or("record: field ends early")?),
        ));
        offset = end;
    }
    if offset != raw.len() {
        return Err("record: trailing bytes".into());
    }
    Ok(out)
}

/// A composite as an object, field name → value. If the value's fields do not match the
/// type's as planned, in number or in any field's type (the type was altered since the
/// session learnt it: its field list is cached), the server's text, which is current.
fn composite(
    fields: &[(String, u32, Decoder)],
    ty: &Type,
    raw: &[u8],
    at: &mut Pointer,
    pending: &mut Vec<Pending>,
    depth: usize,
) -> Result<Value, BoxError> {
    let values = fields_of(raw)?;
    let as_planned = values.len() == fields.len()
        && fields
            .iter()
            .zip(&values)
            .all(|((_, oid, _), (got, _))| oid == got);
    if !as_planned {
        return Ok(server_text(ty, raw, at, pending));
    }
    let mut out = Map::with_capacity(fields.len());
    let mark = at.0.len();
    for ((name, _, decoder), (_, bytes)) in fields.iter().zip(values) {
        at.push(name);
        let v = match bytes {
            None => Value::Null,
            Some(b) => decode(decoder, b, at, pending, depth + 1)?,
        };
        at.pop_to(mark);
        out.insert(name.clone(), v);
    }
    Ok(Value::Object(out))
}

/// An anonymous record as an array of its field values (it has no field names).
fn record(
    raw: &[u8],
    at: &mut Pointer,
    pending: &mut Vec<Pending>,
    depth: usize,
) -> Result<Value, BoxError> {
    let mut out = Vec::new();
    let mark = at.0.len();
    for (k, (oid, bytes)) in fields_of(raw)?.into_iter().enumerate() {
        at.push(&k.to_string());
        let v = match bytes {
            None => Value::Null,
            Some(b) => decode(&decoder_for_oid(oid), b, at, pending, depth + 1)?,
        };
        at.pop_to(mark);
        out.push(v);
    }
    Ok(Value::Array(out))
}

/// A binary value passed back to the server as it came, for its text output.
#[derive(Debug)]
struct Binary<'a>(&'a [u8]);

impl ToSql for Binary<'_> {
    fn to_sql(&self, _: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, BoxError> {
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    postgres_types::to_sql_checked!();
}

/// The server's text output of a value of any type (its output function, through
/// `format('%s', ...)`, qualified: the session's search_path is the client's).
const TEXT_OUTPUT: &str = "SELECT pg_catalog.format('%s', $1)";

/// Fills in every pending value of `rows` (`pending[k].0` is the row) with the server's
/// text output of it.
pub async fn resolve_pending(
    client: &tokio_postgres::Client,
    rows: &mut [Map<String, Value>],
    pending: Vec<(usize, Pending)>,
) -> Result<(), tokio_postgres::Error> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    let texts: Vec<(usize, String, String)> = stream::iter(pending)
        .map(|(row, p)| async move {
            let r = client
                .query_typed_one(
                    TEXT_OUTPUT,
                    &[(&Binary(&p.raw) as &(dyn ToSql + Sync), p.ty)],
                )
                .await?;
            Ok::<_, tokio_postgres::Error>((row, p.pointer, r.try_get::<_, String>(0)?))
        })
        .buffered(PENDING_IN_FLIGHT)
        .try_collect()
        .await?;
    for (row, pointer, text) in texts {
        if let Some(slot) = rows.get_mut(row).and_then(|r| pointer_mut(r, &pointer)) {
            *slot = Value::String(text);
        }
    }
    Ok(())
}

/// `pointer` (`/key/...`) inside a row object.
fn pointer_mut<'a>(row: &'a mut Map<String, Value>, pointer: &str) -> Option<&'a mut Value> {
    let rest = pointer.strip_prefix('/')?;
    let (first, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let key = first.replace("~1", "/").replace("~0", "~");
    let v = row.get_mut(&key)?;
    if tail.is_empty() {
        Some(v)
    } else {
        v.pointer_mut(tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn duplicate_names_are_renamed_and_keep_every_value() {
        assert_eq!(column_keys(&["x", "x"]), vec!["x", "x_2"]);
        assert_eq!(column_keys(&["x", "x_2", "x"]), vec!["x", "x_2", "x_3"]);
        assert_eq!(column_keys(&["a", "b"]), vec!["a", "b"]);
        assert_eq!(
            column_keys(&["?column?", "?column?", "?column?"]),
            vec!["?column?", "?column?_2", "?column?_3"]
        );
    }

    fn array_bytes(dims: &[(i32, i32)], elem_oid: u32, elems: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(dims.len() as i32).to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&elem_oid.to_be_bytes());
        for (len, lower) in dims {
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&lower.to_be_bytes());
        }
        for e in elems {
            match e {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(x) => {
                    b.extend_from_slice(&(x.len() as i32).to_be_bytes());
                    b.extend_from_slice(x);
                }
            }
        }
        b
    }

    fn dec(d: &Decoder, raw: &[u8]) -> (Value, Vec<Pending>) {
        let mut pending = Vec::new();
        let v = decode(d, raw, &mut Pointer::new("v"), &mut pending, 0).unwrap();
        (v, pending)
    }

    #[test]
    fn multidimensional_arrays_nest() {
        let one = 1i32.to_be_bytes();
        let two = 2i32.to_be_bytes();
        let three = 3i32.to_be_bytes();
        let raw = array_bytes(
            &[(2, 1), (2, 1)],
            23,
            &[Some(&one), Some(&two), Some(&three), None],
        );
        let d = Decoder::for_type(&Type::INT4_ARRAY);
        assert_eq!(dec(&d, &raw).0, json!([[1, 2], [3, null]]));
        assert_eq!(dec(&d, &array_bytes(&[], 23, &[])).0, json!([]));
        // A lower bound other than 1 is the server's text (it keeps the bounds).
        let (v, pending) = dec(&d, &array_bytes(&[(1, 0)], 23, &[Some(&one)]));
        assert_eq!(v, Value::Null);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].pointer, "/v");
        // Short or trailing bytes are errors, not a shorter array.
        let mut long = raw.clone();
        long.push(0);
        assert!(decode(&d, &long, &mut Pointer::new("v"), &mut vec![], 0).is_err());
        assert!(decode(
            &d,
            &raw[..raw.len() - 5],
            &mut Pointer::new("v"),
            &mut vec![],
            0
        )
        .is_err());
    }

    #[test]
    fn infinite_and_far_timestamps_and_dates() {
        let ts = |m: i64| dec(&Decoder::Timestamptz, &m.to_be_bytes());
        assert_eq!(ts(i64::MAX).0, json!("infinity"));
        assert_eq!(ts(i64::MIN).0, json!("-infinity"));
        assert_eq!(ts(0).0, json!("2000-01-01T00:00:00Z"));
        assert_eq!(
            dec(&Decoder::Timestamp, &1_500_000i64.to_be_bytes()).0,
            json!("2000-01-01T00:00:01.500000")
        );
        assert_eq!(
            dec(&Decoder::Date, &i32::MIN.to_be_bytes()).0,
            json!("-infinity")
        );
        assert_eq!(
            dec(&Decoder::Date, &(-1i32).to_be_bytes()).0,
            json!("1999-12-31")
        );
        // 4713 BC: no RFC 3339 form, so the server's text.
        let (v, pending) = dec(&Decoder::Date, &(-2_451_545i32).to_be_bytes());
        assert_eq!((v, pending.len()), (Value::Null, 1));
    }

    #[test]
    fn pointers_escape_and_find_their_slot() {
        let mut row = Map::new();
        row.insert("a/b~".into(), json!({"f": [null, null]}));
        let mut p = Pointer::new("a/b~");
        p.push("f");
        p.push("1");
        assert_eq!(p.0, "/a~1b~0/f/1");
        *pointer_mut(&mut row, &p.0).unwrap() = json!("x");
        assert_eq!(row["a/b~"], json!({"f": [null, "x"]}));
    }

    fn record_bytes(fields: &[(u32, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = (fields.len() as i32).to_be_bytes().to_vec();
        for (oid, v) in fields {
            b.extend_from_slice(&oid.to_be_bytes());
            match v {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(x) => {
                    b.extend_from_slice(&(x.len() as i32).to_be_bytes());
                    b.extend_from_slice(x);
                }
            }
        }
        b
    }

    #[test]
    fn a_composite_whose_fields_changed_is_the_servers_text() {
        let ty = Type::new("pair".into(), 90_000, Kind::Simple, "public".into());
        let d = Decoder::Composite(
            vec![
                ("a".into(), 23, Decoder::Int4),
                ("b".into(), 25, Decoder::Text),
            ],
            ty,
        );
        let one = 1i32.to_be_bytes();
        let (v, pending) = dec(&d, &record_bytes(&[(23, Some(&one)), (25, Some(b"x"))]));
        assert_eq!((v, pending.len()), (json!({"a": 1, "b": "x"}), 0));
        // Same count, but the second field is an int4 now (the session's cached layout is
        // stale): never read its bytes as text.
        let (v, pending) = dec(&d, &record_bytes(&[(23, Some(&one)), (23, Some(&one))]));
        assert_eq!((v, pending.len()), (Value::Null, 1));
        let (_, pending) = dec(&d, &record_bytes(&[(23, Some(&one))]));
        assert_eq!(pending.len(), 1);
    }

    #[test]
    fn twenty_four_hundred_is_not_midnight() {
        let t = |m: i64| dec(&Decoder::Time, &m.to_be_bytes()).0;
        assert_eq!(t(86_400_000_000), json!("24:00:00"));
        assert_eq!(t(0), json!("00:00:00"));
    }

    #[test]
    fn char_prints_like_postgres() {
        assert_eq!(char_text(b'a'), "a");
        assert_eq!(char_text(0), "");
        assert_eq!(char_text(200), "\\310");
    }
}
