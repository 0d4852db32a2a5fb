// TEMPORARY: replaced by the full converter before commit.
use bytes::BytesMut;
use postgres_types::{Format, IsNull, ToSql, Type};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("parameter ${index}: {message}")]
    Param { index: usize, message: String },
    #[error("parameter count mismatch: statement takes {expected}, got {got}")]
    ParamCount { expected: usize, got: usize },
    #[error("column {column}: unsupported type {type_name} (cast it, e.g. {column}::text)")]
    Column { column: String, type_name: String },
    #[error("column {column}: {message}")]
    Decode { column: String, message: String },
}

#[derive(Debug)]
pub struct JsonParam<'a>(pub &'a Value);

impl ToSql for JsonParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Value::Null => return Ok(IsNull::Yes),
            Value::String(s) => out.extend_from_slice(s.as_bytes()),
            other => out.extend_from_slice(other.to_string().as_bytes()),
        }
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

pub fn check_params(types: &[Type], params: &[Value]) -> Result<(), ConvertError> {
    if types.len() != params.len() {
        return Err(ConvertError::ParamCount {
            expected: types.len(),
            got: params.len(),
        });
    }
    Ok(())
}

pub fn row_to_json(
    row: &tokio_postgres::Row,
) -> Result<serde_json::Map<String, Value>, ConvertError> {
    let mut m = serde_json::Map::new();
    for (i, c) in row.columns().iter().enumerate() {
        let v = match *c.type_() {
            Type::INT4 => row
                .try_get::<_, Option<i32>>(i)
                .ok()
                .flatten()
                .map(Value::from),
            Type::INT8 => row
                .try_get::<_, Option<i64>>(i)
                .ok()
                .flatten()
                .map(Value::from),
            Type::TEXT => row
                .try_get::<_, Option<String>>(i)
                .ok()
                .flatten()
                .map(Value::from),
            _ => None,
        };
        m.insert(c.name().to_owned(), v.unwrap_or(Value::Null));
    }
    Ok(m)
}
