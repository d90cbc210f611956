//! The event's top-level objects (`journey`, `params`, `context`) as their
//! entries in order, instead of a hashed map.
//!
//! An event's objects are small and read a handful of times (the params
//! check, the template's paths, the result record), so a list searched in
//! order costs less to build and to search than a hash table of the same
//! entries: no key is hashed, and there is no table to allocate beside the
//! entries. Nested values stay `serde_json::Value`s.
//!
//! A big object costs more to search: each key looked up (a declared
//! parameter, a template path) is compared with every entry before it, so a
//! `params` of 10 000 entries costs up to 10 000 comparisons per path.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A JSON object, its entries in the order the event gave them. A key
/// given twice keeps its first place and its last value, as `serde_json`'s
/// order-preserving map does.
#[derive(Debug, Clone, Default)]
pub struct Object(Vec<(String, Value)>);

/// Up to this many entries, a repeated key is looked for among those
/// before it as each is added; a bigger object goes through a hashed map.
const SEARCHED: usize = 16;

impl Object {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.into_iter()
    }

    fn from_entries(mut entries: Vec<(String, Value)>) -> Object {
        if entries.len() > SEARCHED {
            let map: Map<String, Value> = entries.into_iter().collect();
            return Object::from(map);
        }
        let mut i = 1;
        while i < entries.len() {
            match entries[..i].iter().position(|(k, _)| *k == entries[i].0) {
                Some(first) => {
                    let (_, value) = entries.remove(i);
                    entries[first].1 = value;
                }
                None => i += 1,
            }
        }
        Object(entries)
    }
}

impl From<Map<String, Value>> for Object {
    fn from(map: Map<String, Value>) -> Object {
        Object(map.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Object {
    type Item = (&'a String, &'a Value);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, Value)>,
        fn(&'a (String, Value)) -> (&'a String, &'a Value),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl Serialize for Object {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
        struct Entries;

        impl<'de> Visitor<'de> for Entries {
            type Value = Object;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Object, A::Error> {
                let mut entries = Vec::with_capacity(access.size_hint().unwrap_or(0).min(SEARCHED));
                while let Some(entry) = access.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(Object::from_entries(entries))
            }
        }

        d.deserialize_map(Entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parsed both ways: as an `Object` and as serde_json's map.
    fn both(json: &str) -> (Object, Map<String, Value>) {
        (
            serde_json::from_str(json).unwrap(),
            serde_json::from_str(json).unwrap(),
        )
    }

    #[test]
    fn entries_keep_the_order_and_repeated_keys_as_serde_json_keeps_them() {
        let mut big = String::from("{");
        for i in 0..40 {
            big.push_str(&format!("\"k{}\": {i}, ", i % 25));
        }
        big.push_str("\"z\": {\"b\": 1, \"a\": 2}}");
        for json in [
            r#"{}"#,
            r#"{"b": 1, "a": [1, 2], "c": {"y": 1, "x": null}}"#,
            r#"{"a": 1, "b": 2, "a": 3}"#,
            r#"{"a": 1, "a": 2, "a": {"n": 3}, "b": 4}"#,
            &big,
        ] {
            let (ours, theirs) = both(json);
            let ours_entries: Vec<_> = ours.iter().collect();
            let their_entries: Vec<_> = theirs.iter().collect();
            assert_eq!(ours_entries, their_entries, "{json}");
            assert_eq!(
                serde_json::to_string(&ours).unwrap(),
                serde_json::to_string(&theirs).unwrap(),
                "{json}"
            );
            for (k, v) in &theirs {
                assert_eq!(ours.get(k), Some(v), "{json}: {k}");
            }
            assert_eq!(ours.get("missing"), None);
            assert_eq!(ours.len(), theirs.len());
        }
    }

    #[test]
    fn only_an_object_is_an_object() {
        for json in ["[]", "1", "\"a\"", "null", "{\"a\": }"] {
            assert!(serde_json::from_str::<Object>(json).is_err(), "{json}");
        }
    }
}
