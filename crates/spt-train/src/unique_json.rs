//! JSON whose objects name each key once. serde_json keeps the last of a repeated key without a
//! word: in a data row or a config file that is a value the user may not have meant.

use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A JSON value in which no object repeats a key (at any depth).
pub(crate) struct UniqueKeys(pub(crate) Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Visit).map(UniqueKeys)
    }
}

impl From<UniqueKeys> for Value {
    fn from(u: UniqueKeys) -> Value {
        u.0
    }
}

/// An object refusing a repeated key; its values read as `V` (plain [`Value`]s where only the
/// top level matters, [`UniqueKeys`] to refuse repeats at any depth).
pub(crate) fn unique_map<'de, A, V>(mut map: A) -> Result<Map<String, Value>, A::Error>
where
    A: MapAccess<'de>,
    V: Deserialize<'de> + Into<Value>,
{
    let mut out = Map::new();
    while let Some((k, v)) = map.next_entry::<String, V>()? {
        if out.contains_key(&k) {
            return Err(A::Error::custom(format!("key `{k}` appears twice")));
        }
        out.insert(k, v.into());
    }
    Ok(out)
}

struct Visit;

impl<'de> Visitor<'de> for Visit {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        unique_map::<A, UniqueKeys>(map).map(Value::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(UniqueKeys(v)) = seq.next_element::<UniqueKeys>()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_bool<E: Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E: Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        UniqueKeys::deserialize(d).map(|u| u.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_is_refused_at_any_depth() {
        let ok: UniqueKeys = serde_json::from_str(r#"{"a": [1, {"b": 2.5}], "c": null}"#).unwrap();
        assert_eq!(ok.0, serde_json::json!({"a": [1, {"b": 2.5}], "c": null}));
        for text in [
            r#"{"a": 1, "a": 2}"#,
            r#"{"o": {"x": 1}, "p": [{"y": 1, "y": 1}]}"#,
        ] {
            let e = serde_json::from_str::<UniqueKeys>(text)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("appears twice"), "{e}");
        }
    }
}
