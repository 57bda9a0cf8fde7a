//! Writes `../KIND.json`: the `openAPIV3Schema` of each CRD, with
//! `additionalProperties: false` on every object that lists its properties (what
//! the API server's structural schemas do: unknown fields are refused).

use kube::CustomResourceExt;
use serde_json::Value;

fn strict(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.contains_key("properties") && !m.contains_key("additionalProperties") {
                m.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (_, x) in m.iter_mut() {
                strict(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strict),
        _ => {}
    }
}

fn main() {
    use gateway_api::{gatewayclasses::GatewayClass, gateways::Gateway, httproutes::HttpRoute, referencegrants::ReferenceGrant};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (kind, crd) in [
        ("GatewayClass", GatewayClass::crd()),
        ("Gateway", Gateway::crd()),
        ("HTTPRoute", HttpRoute::crd()),
        ("ReferenceGrant", ReferenceGrant::crd()),
    ] {
        let crd = serde_json::to_value(&crd).expect("crd");
        let version = &crd["spec"]["versions"][0];
        let mut schema = version["schema"]["openAPIV3Schema"].clone();
        strict(&mut schema);
        // The metadata is the API server's to check (kubernetes-validate does).
        schema["properties"]["metadata"] = serde_json::json!({"type": "object"});
        let out = serde_json::json!({
            "group": crd["spec"]["group"], "version": version["name"], "kind": kind, "schema": schema,
        });
        std::fs::write(dir.join(format!("{kind}.json")), serde_json::to_string_pretty(&out).expect("json") + "\n")
            .expect("write");
    }
}
