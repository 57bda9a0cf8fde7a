//! The object store's writes (the server's metadata, the change log) and the patches.

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{Change, Res, Store};

/// RFC 7386.
pub(super) fn merge(doc: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !doc.is_object() {
                *doc = json!({});
            }
            for (k, v) in p {
                if v.is_null() {
                    if let Some(m) = doc.as_object_mut() {
                        m.remove(k);
                    }
                } else {
                    merge(&mut doc[k.as_str()], v);
                }
            }
        }
        other => *doc = other.clone(),
    }
}

/// RFC 6902: add, replace, remove, test.
pub(super) fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    for op in ops.as_array().ok_or("a JSON patch is an array")? {
        let path = op["path"].as_str().ok_or("op without path")?;
        let (parent, last) = path.rsplit_once('/').ok_or("bad path")?;
        let last = last.replace("~1", "/").replace("~0", "~");
        match op["op"].as_str() {
            Some("test") => {
                if doc.pointer(path) != Some(&op["value"]) {
                    return Err(format!("test failed at {path}"));
                }
            }
            Some("remove") => {
                let p = doc.pointer_mut(parent).ok_or("no parent")?;
                match p {
                    Value::Object(m) => {
                        m.remove(&last).ok_or("nothing to remove")?;
                    }
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        if i >= a.len() {
                            return Err("bad index".into());
                        }
                        a.remove(i);
                    }
                    _ => return Err("bad parent".into()),
                }
            }
            Some("add") | Some("replace") => {
                let p = doc.pointer_mut(parent).ok_or("no parent")?;
                let v = op["value"].clone();
                match p {
                    Value::Object(m) => {
                        m.insert(last, v);
                    }
                    Value::Array(a) if last == "-" => a.push(v),
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        if op["op"] == "add" && i <= a.len() {
                            a.insert(i, v);
                        } else if i < a.len() {
                            a[i] = v;
                        } else {
                            return Err("bad index".into());
                        }
                    }
                    _ => return Err("bad parent".into()),
                }
            }
            other => return Err(format!("op {other:?} not supported")),
        }
    }
    Ok(())
}

/// Stores `obj` as the next version, with the metadata the server owns.
pub(super) fn put(
    st: &mut Store,
    changes: &broadcast::Sender<Change>,
    r: &'static Res,
    ns: &str,
    mut obj: Value,
    prev: Option<&Value>,
) -> Value {
    st.rv += 1;
    let rv = st.rv;
    obj["apiVersion"] = json!(r.api_version());
    obj["kind"] = json!(r.kind);
    if r.namespaced {
        obj["metadata"]["namespace"] = json!(ns);
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let generation = match prev {
        Some(p) => {
            obj["metadata"]["uid"] = p["metadata"]["uid"].clone();
            obj["metadata"]["creationTimestamp"] = p["metadata"]["creationTimestamp"].clone();
            let g = p["metadata"]["generation"].as_i64().unwrap_or(1);
            if p["spec"] != obj["spec"] {
                g + 1
            } else {
                g
            }
        }
        None => {
            st.uid += 1;
            obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", st.uid));
            obj["metadata"]["creationTimestamp"] = json!("2026-12-07T00:00:00Z");
            1
        }
    };
    obj["metadata"]["generation"] = json!(generation);
    let kind = if prev.is_some() { "MODIFIED" } else { "ADDED" };
    st.objects
        .insert((r.plural, ns.to_string(), name), obj.clone());
    let c = Change {
        rv,
        plural: r.plural,
        namespace: ns.to_string(),
        kind,
        object: obj.clone(),
    };
    st.log.push(c.clone());
    let _ = changes.send(c);
    obj
}

pub(super) fn remove(
    st: &mut Store,
    changes: &broadcast::Sender<Change>,
    r: &'static Res,
    ns: &str,
    name: &str,
) -> Option<Value> {
    let ns = if r.namespaced { ns } else { "" };
    let mut obj = st
        .objects
        .remove(&(r.plural, ns.to_string(), name.to_string()))?;
    st.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    let c = Change {
        rv: st.rv,
        plural: r.plural,
        namespace: ns.to_string(),
        kind: "DELETED",
        object: obj.clone(),
    };
    st.log.push(c.clone());
    let _ = changes.send(c);
    Some(obj)
}
