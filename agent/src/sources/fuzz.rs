//! Input generators for the parser property tests (`flannel`, `manifests`): arbitrary text, and
//! valid JSON documents mutated the ways hand-written and corrupted documents go wrong.
//!
//! Each property test sets its own case count, small enough that the whole unit suite stays
//! fast in a debug build; `PROPTEST_CASES` raises them all for a longer run.

use proptest::{
    prelude::*,
    test_runner::{Config, RngAlgorithm},
};
use serde_json::{Map, Value, json};

/// `cases` per property, unless `PROPTEST_CASES` asks for more.
pub(crate) fn config(cases: u32) -> Config {
    let asked = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Config {
        cases: cases.max(asked),
        // Failures are reported with their minimal input; no regression files in the tree.
        failure_persistence: None,
        // ChaCha, the default, dominates the run time of an unoptimised build.
        rng_algorithm: RngAlgorithm::XorShift,
        ..Config::default()
    }
}

/// Text a parser may be handed: any Unicode, bytes read lossily, and JSON/YAML-shaped noise
/// that gets further into the parsers than random text does.
pub(crate) fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        prop::collection::vec(any::<u8>(), 0..256)
            .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
        "[{}\\[\\]\":,0-9a-zA-Z./ \n-]{0,80}",
        "[-:&|!*#%@`'?>{}\\[\\], \n\t0-9a-z.]{0,80}",
    ]
}

/// A value of a type or size no valid document has in that place.
pub(crate) fn odd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop::num::f64::NORMAL.prop_map(Value::from),
        prop::sample::select(vec![
            json!(0),
            json!(-1),
            json!(65_536),
            json!(4_294_967_296_u64),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1e300),
            json!(-0.5),
            json!(""),
            json!("None"),
            json!("0"),
            json!("-1"),
            json!("10.0.0.0/33"),
            json!("10.0.0.0/-1"),
            json!("300.1.2.3/16"),
            json!("10.0.0.1/8"),
            json!("010.0.0.0/8"),
            json!("1.2.3"),
            json!("::1"),
            json!("fd00::/64"),
            json!(" 10.0.0.1 "),
            json!("\u{0}"),
            json!("İK\u{212a}ſ\u{202e}💥"),
            json!([]),
            json!({}),
        ]),
        any::<String>().prop_map(Value::from),
        "[0-9./:-]{0,24}".prop_map(Value::from),
        "[a-zA-Z]{1,10}".prop_map(Value::from),
        // Far deeper than any document, beyond serde's recursion limits.
        (1usize..300, any::<bool>()).prop_map(|(depth, objects)| nest(depth, objects)),
        Just(Value::String("x".repeat(10_000))),
    ]
}

fn nest(depth: usize, objects: bool) -> Value {
    (0..depth).fold(Value::Null, |inner, _| {
        if objects {
            json!({ "a": inner })
        } else {
            json!([inner])
        }
    })
}

/// One change to a document, at the place its number picks (modulo) among all its places.
#[derive(Clone, Debug)]
pub(crate) enum Mutation {
    /// Remove the field or element.
    Drop(usize),
    /// Replace it with an odd value.
    Retype(usize, Value),
    /// Repeat it: an element is appended again, a field is repeated under its name in
    /// another case (Go's encoding/json matches names case-insensitively).
    Duplicate(usize, bool),
    /// Add a field beside it that no schema has.
    Extra(usize, String, Value),
}

pub(crate) fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Drop),
        (any::<usize>(), odd_value()).prop_map(|(at, value)| Mutation::Retype(at, value)),
        (any::<usize>(), any::<bool>()).prop_map(|(at, upper)| Mutation::Duplicate(at, upper)),
        (any::<usize>(), "[a-zA-Z.]{1,12}", odd_value())
            .prop_map(|(at, name, value)| Mutation::Extra(at, name, value)),
    ]
}

/// `doc` after one to four mutations.
pub(crate) fn mutated(doc: Value) -> impl Strategy<Value = Value> {
    prop::collection::vec(mutation(), 1..5).prop_map(move |mutations| {
        let mut doc = doc.clone();
        for mutation in &mutations {
            apply(&mut doc, mutation);
        }
        doc
    })
}

/// Every place in `value` below its root, as JSON pointers.
fn places(value: &Value, at: &str, out: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.replace('~', "~0").replace('/', "~1"), v))
            .collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => Vec::new(),
    };
    for (name, child) in children {
        let pointer = format!("{at}/{name}");
        places(child, &pointer, out);
        out.push(pointer);
    }
}

fn apply(doc: &mut Value, mutation: &Mutation) {
    let mut all = Vec::new();
    places(doc, "", &mut all);
    let at = match mutation {
        Mutation::Drop(at)
        | Mutation::Retype(at, _)
        | Mutation::Duplicate(at, _)
        | Mutation::Extra(at, _, _) => at,
    };
    let Some(pointer) = (!all.is_empty()).then(|| all[at % all.len()].clone()) else {
        return;
    };
    let (parent, last) = pointer.rsplit_once('/').expect("pointers start with /");
    let last = last.replace("~1", "/").replace("~0", "~");
    let Some(target) = doc.pointer(&pointer).cloned() else {
        return;
    };
    let Some(parent) = doc.pointer_mut(parent) else {
        return;
    };
    match (mutation, parent) {
        (Mutation::Drop(_), Value::Object(map)) => {
            map.remove(&last);
        }
        (Mutation::Drop(_), Value::Array(items)) => {
            items.remove(last.parse::<usize>().expect("an index"));
        }
        (Mutation::Retype(_, value), parent) => {
            if let Some(slot) = parent.pointer_mut(&format!("/{}", escape(&last))) {
                *slot = value.clone();
            }
        }
        (Mutation::Duplicate(_, upper), Value::Object(map)) => {
            let name = if *upper {
                last.to_uppercase()
            } else {
                last.to_lowercase()
            };
            map.insert(name, target);
        }
        (Mutation::Duplicate(..), Value::Array(items)) => items.push(target),
        (Mutation::Extra(_, name, value), Value::Object(map)) => {
            map.insert(name.clone(), value.clone());
        }
        (Mutation::Extra(_, name, value), Value::Array(items)) => {
            let mut extra = Map::new();
            extra.insert(name.clone(), value.clone());
            items.push(Value::Object(extra));
        }
        _ => {}
    }
}

fn escape(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_reach_nested_places() {
        let mut doc = json!({"a": {"b/c": [1, 2]}});
        let mut all = Vec::new();
        places(&doc, "", &mut all);
        assert_eq!(all, ["/a/b~1c/0", "/a/b~1c/1", "/a/b~1c", "/a"]);
        apply(&mut doc, &Mutation::Drop(0));
        assert_eq!(doc, json!({"a": {"b/c": [2]}}));
        apply(&mut doc, &Mutation::Retype(1, json!(7)));
        assert_eq!(doc, json!({"a": {"b/c": 7}}));
        apply(&mut doc, &Mutation::Duplicate(0, true));
        assert_eq!(doc, json!({"a": {"b/c": 7, "B/C": 7}}));
    }
}
