//! The HTTP side: paths, discovery, list, watch, writes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};

use super::store::{json_patch, merge, put, remove};
use super::{Change, Inner, Res, RESOURCES};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn reply(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    reply(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// The parts of a resource path.
struct Target {
    res: &'static Res,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Result<Target, ()> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(()),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => {
            (Some(ns.to_string()), [&[*plural][..], rest].concat())
        }
        _ => (None, rest.to_vec()),
    };
    let find = |plural: &str| {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    };
    match rest.as_slice() {
        [plural] => Ok(Target {
            res: find(plural).ok_or(())?,
            namespace,
            name: None,
            status: false,
        }),
        [plural, name] => Ok(Target {
            res: find(plural).ok_or(())?,
            namespace,
            name: Some(name.to_string()),
            status: false,
        }),
        [plural, name, "status"] => Ok(Target {
            res: find(plural).ok_or(())?,
            namespace,
            name: Some(name.to_string()),
            status: true,
        }),
        // `GET /api/v1/namespaces/NAME`: the Namespace itself.
        [] if namespace.is_some() && group.is_empty() => Ok(Target {
            res: find("namespaces").ok_or(())?,
            namespace: None,
            name: namespace,
            status: false,
        }),
        _ => Err(()),
    }
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2C", ",").replace("%3D", "=")))
        .collect()
}

fn count(inner: &Inner, verb: &str) {
    *inner
        .store
        .lock()
        .unwrap()
        .requests
        .entry(verb.to_string())
        .or_default() += 1;
}

pub(super) async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if let Some(d) = discovery(&path) {
        count(&inner, "discovery");
        return reply(StatusCode::OK, &d);
    }
    let Ok(t) = parse_path(&path) else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    let q = query(&req);
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    match (method, &t.name) {
        (Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            count(&inner, "watch");
            watch(inner, t.res, t.namespace, &q)
        }
        (Method::GET, None) => {
            count(&inner, "list");
            list(&inner, t.res, t.namespace.as_deref(), &q)
        }
        (Method::GET, Some(name)) => {
            count(&inner, "get");
            let st = inner.store.lock().unwrap();
            let ns = t.namespace.clone().unwrap_or_default();
            match st.objects.get(&(t.res.plural, ns, name.clone())) {
                Some(o) => reply(StatusCode::OK, o),
                None => not_found(t.res, name),
            }
        }
        (Method::POST, None) => {
            count(&inner, "create");
            write(&inner, &t, &body, Write::Create, &content_type)
        }
        (Method::PUT, Some(_)) => {
            count(&inner, "update");
            write(&inner, &t, &body, Write::Replace, &content_type)
        }
        (Method::PATCH, Some(_)) => {
            count(&inner, "patch");
            write(&inner, &t, &body, Write::Patch, &content_type)
        }
        (Method::DELETE, Some(name)) => {
            count(&inner, "delete");
            let mut st = inner.store.lock().unwrap();
            let ns = t.namespace.clone().unwrap_or_default();
            match remove(&mut st, &inner.changes, t.res, &ns, name) {
                Some(o) => reply(StatusCode::OK, &o),
                None => not_found(t.res, name),
            }
        }
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the stand-in",
        ),
    }
}

fn not_found(r: &Res, name: &str) -> Response<Body> {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{}.{} \"{name}\" not found", r.plural, r.group),
    )
}

/// The legacy discovery documents (what kubectl reads).
fn discovery(path: &str) -> Option<Value> {
    let resources = |group: &str, version: &str| {
        let mut list: Vec<Value> = Vec::new();
        for r in RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
        {
            list.push(json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}));
            if r.status {
                list.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                    "kind": r.kind, "verbs": ["get", "patch", "update"]}));
            }
        }
        json!({"kind": "APIResourceList", "apiVersion": "v1",
               "groupVersion": if group.is_empty() { version.to_string() } else { format!("{group}/{version}") },
               "resources": list})
    };
    match path.trim_end_matches('/') {
        "/version" => Some(
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-portier-standin", "platform": "linux/amd64"}),
        ),
        "/api" => Some(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ),
        "/api/v1" => Some(resources("", "v1")),
        "/apis" => {
            let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
                let v = groups.entry(r.group).or_default();
                if !v.contains(&r.version) {
                    v.push(r.version);
                }
            }
            let groups: Vec<Value> = groups
                .iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        p => {
            let parts: Vec<&str> = p.trim_start_matches('/').split('/').collect();
            match parts.as_slice() {
                ["apis", g, v] if RESOURCES.iter().any(|r| r.group == *g && r.version == *v) => {
                    Some(resources(g, v))
                }
                _ => None,
            }
        }
    }
}

fn list(
    inner: &Inner,
    r: &'static Res,
    ns: Option<&str>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let st = inner.store.lock().unwrap();
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((p, n, _), _)| *p == r.plural && ns.is_none_or(|ns| ns == n))
        .filter(|(_, o)| labels_match(o, &selector))
        .map(|(_, o)| o.clone())
        .collect();
    reply(
        StatusCode::OK,
        &json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
    )
}

/// `a=b,c=d` equality selectors only.
fn labels_match(o: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|kv| match kv.split_once('=') {
            Some((k, v)) => o["metadata"]["labels"][k].as_str() == Some(v),
            None => !o["metadata"]["labels"][kv].is_null(),
        })
}

fn event(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(
    inner: Arc<Inner>,
    r: &'static Res,
    ns: Option<String>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1800u64);
    // Subscribe first, then replay: nothing falls between the two.
    let mut sub = inner.changes.subscribe();
    let (replay, last, gone) = replay(&inner, r, ns.as_deref(), from);
    tokio::spawn(async move {
        if gone {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410});
            let _ = tx.send(Ok(Frame::data(event("ERROR", &status)))).await;
            return;
        }
        for b in replay {
            if tx.send(Ok(Frame::data(b))).await.is_err() {
                return;
            }
        }
        let end = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.tick().await;
        let mut seen = last;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(end) => return,
                _ = tick.tick(), if bookmarks => {
                    let rv = inner.store.lock().unwrap().rv;
                    let mark = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(Ok(Frame::data(event("BOOKMARK", &mark)))).await.is_err() {
                        return;
                    }
                }
                c = sub.recv() => match c {
                    Ok(c) => {
                        if c.rv <= seen || c.plural != r.plural || ns.as_ref().is_some_and(|n| *n != c.namespace) {
                            continue;
                        }
                        seen = c.rv;
                        if tx.send(Ok(Frame::data(event(c.kind, &c.object)))).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                },
            }
        }
    });
    let stream = tokio_stream_from(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .expect("response")
}

/// What a watch from version `from` starts with: the events to send, the version they
/// reach, and whether `from` is older than the last compaction (410 Gone). From no
/// version: every object as `ADDED`.
fn replay(inner: &Inner, r: &Res, ns: Option<&str>, from: u64) -> (Vec<Bytes>, u64, bool) {
    let st = inner.store.lock().unwrap();
    let in_ns = |n: &str| ns.is_none_or(|ns| ns == n);
    if from == 0 {
        let objs = st
            .objects
            .iter()
            .filter(|((p, n, _), _)| *p == r.plural && in_ns(n))
            .map(|(_, o)| event("ADDED", o))
            .collect();
        (objs, st.rv, false)
    } else if from < st.floor {
        (Vec::new(), st.rv, true)
    } else {
        let objs = st
            .log
            .iter()
            .filter(|c: &&Change| c.rv > from && c.plural == r.plural && in_ns(&c.namespace))
            .map(|c| event(c.kind, &c.object))
            .collect();
        (objs, st.rv, false)
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

enum Write {
    Create,
    Replace,
    Patch,
}

fn write(inner: &Inner, t: &Target, body: &[u8], how: Write, content_type: &str) -> Response<Body> {
    let patch: Value = match parse_body(body, content_type) {
        Ok(v) => v,
        Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let ns = if t.res.namespaced {
        t.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    let name = t
        .name
        .clone()
        .or_else(|| patch["metadata"]["name"].as_str().map(str::to_string))
        .unwrap_or_default();
    let mut st = inner.store.lock().unwrap();
    let prev = st
        .objects
        .get(&(t.res.plural, ns.clone(), name.clone()))
        .cloned();
    let next = match (&how, &prev) {
        (Write::Create, Some(_)) => {
            return failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{} \"{name}\" already exists", t.res.plural),
            )
        }
        (Write::Create, None) => patch,
        (_, None) => return not_found(t.res, &name),
        (Write::Replace, Some(p)) => {
            let want = patch["metadata"]["resourceVersion"].as_str().unwrap_or("");
            let have = p["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !want.is_empty() && want != have {
                return failure(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", t.res.plural),
                );
            }
            patch
        }
        (Write::Patch, Some(p)) => {
            let mut doc = p.clone();
            if content_type.starts_with("application/json-patch+json") {
                if let Err(e) = json_patch(&mut doc, &patch) {
                    return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e);
                }
            } else {
                // Merge patch; server-side apply is applied as a merge of its fields.
                merge(&mut doc, &patch);
            }
            doc
        }
    };
    // The status subresource changes status only; the main resource everything else.
    let next = match (&prev, t.res.status) {
        (Some(p), true) if t.status => {
            let mut o = p.clone();
            o["status"] = next["status"].clone();
            o
        }
        (Some(p), true) => {
            let mut o = next;
            o["status"] = p["status"].clone();
            o
        }
        _ => next,
    };
    let out = put(&mut st, &inner.changes, t.res, &ns, next, prev.as_ref());
    let code = if prev.is_none() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    reply(code, &out)
}

fn parse_body(body: &[u8], content_type: &str) -> Result<Value, String> {
    if content_type.starts_with("application/apply-patch+yaml") {
        // kube-rs and kubectl send JSON, which is YAML.
        return serde_json::from_slice(body).map_err(|e| {
            format!("apply patch: {e} (the stand-in reads JSON-formatted YAML only)")
        });
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}
