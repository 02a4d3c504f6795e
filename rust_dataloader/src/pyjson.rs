//! JSON values re-written exactly as Python's `json.dumps(value, ensure_ascii=False)` writes
//! them: separators `", "` and `": "`, keys in the order read, non-ASCII characters as they
//! are, control characters escaped (`\n`, `\t`, ... or `\u00XX`), floats as Python's `repr`.
//! That is what `transformers`' Jinja `tojson` filter renders, so tool schemas and tool-call
//! arguments come out byte for byte as `apply_chat_template` renders them (contracts.md §2).
//!
//! The value is written while serde walks it, so nothing is reordered; a key that appears
//! twice in one object is an error (Python would keep one of them, silently).

use std::fmt::Write as _;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON value as Python's `json.dumps` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyJson(pub String);

impl PyJson {
    /// Whether the value is a JSON object.
    pub fn is_object(&self) -> bool {
        self.0.starts_with('{')
    }
}

/// Append `s` as a JSON string literal (with quotes), escaped as Python does.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that read back, in fixed notation when the
/// decimal exponent is in [-4, 16), else `d.ddde+XX`.
pub fn write_float(out: &mut String, f: f64) {
    if !f.is_finite() {
        // serde_json never yields these; Python would write NaN / Infinity.
        out.push_str(if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        });
        return;
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7", "0e0".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    out.push_str(sign);
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        } else {
            let point = exp as usize + 1;
            if digits.len() <= point {
                out.push_str(&digits);
                out.push_str(&"0".repeat(point - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..point]);
                out.push('.');
                out.push_str(&digits[point..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
}

struct Writer;

impl<'de> Visitor<'de> for Writer {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(if v { "true" } else { "false" }.into())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        let mut s = String::new();
        write_float(&mut s, v);
        Ok(s)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        let mut s = String::with_capacity(v.len() + 2);
        write_str(&mut s, v);
        Ok(s)
    }
    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Ok("null".into())
    }
    fn visit_none<E: de::Error>(self) -> Result<String, E> {
        Ok("null".into())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
        let mut s = String::from("[");
        let mut first = true;
        while let Some(PyJson(v)) = seq.next_element()? {
            if !first {
                s.push_str(", ");
            }
            first = false;
            s.push_str(&v);
        }
        s.push(']');
        Ok(s)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        let mut s = String::from("{");
        let mut keys: Vec<String> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if keys.contains(&key) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            let PyJson(v) = map.next_value()?;
            if !keys.is_empty() {
                s.push_str(", ");
            }
            write_str(&mut s, &key);
            s.push_str(": ");
            s.push_str(&v);
            keys.push(key);
        }
        s.push('}');
        Ok(s)
    }
}

impl<'de> Deserialize<'de> for PyJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Writer).map(PyJson)
    }
}

/// A value that is either a JSON string (kept as its text) or any other JSON value (as
/// [`PyJson`]). Tool-call arguments and MiniMind's `"tools": "[...]"` are written either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrOrJson {
    Str(String),
    Json(PyJson),
}

impl<'de> Deserialize<'de> for StrOrJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrOrJson;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StrOrJson, E> {
                Ok(StrOrJson::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<StrOrJson, E> {
                Ok(StrOrJson::Str(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<StrOrJson, E> {
                Writer.visit_bool(v).map(|s| StrOrJson::Json(PyJson(s)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StrOrJson, E> {
                Writer.visit_i64(v).map(|s| StrOrJson::Json(PyJson(s)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StrOrJson, E> {
                Writer.visit_u64(v).map(|s| StrOrJson::Json(PyJson(s)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<StrOrJson, E> {
                Writer.visit_f64(v).map(|s| StrOrJson::Json(PyJson(s)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<StrOrJson, E> {
                Ok(StrOrJson::Json(PyJson("null".into())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<StrOrJson, A::Error> {
                Writer.visit_seq(seq).map(|s| StrOrJson::Json(PyJson(s)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<StrOrJson, A::Error> {
                Writer.visit_map(map).map(|s| StrOrJson::Json(PyJson(s)))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(json: &str) -> String {
        serde_json::from_str::<PyJson>(json).unwrap().0
    }

    #[test]
    fn objects_keep_their_order_and_use_python_separators() {
        assert_eq!(
            dumps(r#"{"z":1,"a":[true,false,null],"m":{}, "e": []}"#),
            r#"{"z": 1, "a": [true, false, null], "m": {}, "e": []}"#
        );
        assert!(serde_json::from_str::<PyJson>(r#"{"a":1,"a":2}"#).is_err());
    }

    #[test]
    fn strings_are_escaped_like_json_dumps_without_ensure_ascii() {
        assert_eq!(
            dumps(r#""你好 \"q\" \\ \n\t\r\b\f \u0001 \u007f é 😀""#),
            "\"你好 \\\"q\\\" \\\\ \\n\\t\\r\\b\\f \\u0001 \u{7f} é 😀\""
        );
    }

    #[test]
    fn floats_are_python_reprs() {
        for (json, py) in [
            ("1.0", "1.0"),
            ("-0.0", "-0.0"),
            ("0.5", "0.5"),
            ("1e2", "100.0"),
            ("1.5e15", "1500000000000000.0"),
            ("1e16", "1e+16"),
            ("1.25e17", "1.25e+17"),
            ("0.0001", "0.0001"),
            ("0.00001", "1e-05"),
            ("1.5e-7", "1.5e-07"),
            ("3.141592653589793", "3.141592653589793"),
            ("123.456", "123.456"),
            ("-2", "-2"),
            ("18446744073709551615", "18446744073709551615"),
        ] {
            assert_eq!(dumps(json), py, "{json}");
        }
    }
}
