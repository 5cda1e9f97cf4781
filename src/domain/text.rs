//! Text that can be stored: PostgreSQL's `text` and `jsonb` cannot hold a NUL character, so anything from
//! outside that will be stored is checked here first and refused with the field named, instead of failing
//! later as a database error.

use serde_json::Value;

/// Longest object key kept (S3 allows 1,024 bytes, GCS 1,024, file paths a few thousand).
const MAX_KEY_BYTES: usize = 4096;

/// Whether a key can be stored and looked up again as it is.
pub fn storable_key(key: &str) -> Result<(), String> {
    if key.contains('\0') {
        Err("the object key contains a NUL character, which this service cannot store".to_owned())
    } else if key.len() > MAX_KEY_BYTES {
        Err(format!(
            "the object key is longer than {MAX_KEY_BYTES} bytes"
        ))
    } else {
        Ok(())
    }
}

/// The first place in a JSON document that holds a NUL character (in a string or a member name), as a path
/// such as `message.attributes.objectId` or `items[3]`; `None` when all of it can be stored.
pub fn nul_in(value: &Value) -> Option<String> {
    // Iterative: a hostile document can nest as deep as the parser allows.
    let mut stack = vec![(String::new(), value)];
    while let Some((path, value)) = stack.pop() {
        match value {
            Value::String(s) if s.contains('\0') => return Some(display(path)),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate().rev() {
                    stack.push((format!("{path}[{i}]"), item));
                }
            }
            Value::Object(members) => {
                for (name, member) in members {
                    let at = if path.is_empty() {
                        name.clone()
                    } else {
                        format!("{path}.{name}")
                    };
                    if name.contains('\0') {
                        return Some(display(at));
                    }
                    stack.push((at, member));
                }
            }
            _ => {}
        }
    }
    None
}

fn display(path: String) -> String {
    let path = path.replace('\0', "\\0");
    if path.is_empty() {
        "the body".to_owned()
    } else {
        path
    }
}

/// [`nul_in`] as the error a boundary answers with.
pub fn refuse_nul(value: &Value) -> Result<(), String> {
    match nul_in(value) {
        None => Ok(()),
        Some(path) => Err(format!(
            "{path} contains a NUL character (\\u0000), which this service cannot store"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_nul_anywhere_is_found_with_its_path() {
        assert_eq!(
            nul_in(&json!({"a": [1, {"b": "x\u{0}"}]})).as_deref(),
            Some("a[1].b")
        );
        assert_eq!(nul_in(&json!({"k\u{0}": 1})).as_deref(), Some("k\\0"));
        assert_eq!(nul_in(&json!("\u{0}")).as_deref(), Some("the body"));
        assert_eq!(nul_in(&json!({"a": ["fine", 2, null]})), None);
    }

    #[test]
    fn keys_with_nul_or_past_the_length_bound_are_refused() {
        assert!(storable_key("a/b.txt").is_ok());
        assert!(storable_key("a\0b").unwrap_err().contains("NUL"));
        assert!(storable_key(&"k".repeat(5000)).is_err());
    }
}
