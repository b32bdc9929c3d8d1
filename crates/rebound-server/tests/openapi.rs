#![allow(clippy::unwrap_used)]
//! The OpenAPI spec checked in under `openapi/` must equal the one generated
//! from the handlers. To accept a change of the API:
//! `REBOUND_UPDATE_OPENAPI=1 cargo test -p rebound-server --test openapi`.

#[test]
fn checked_in_spec_matches_the_handlers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/rebound.json");
    let generated = rebound_server::openapi_json();
    if std::env::var_os("REBOUND_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "openapi/rebound.json differs from the spec generated from the handlers; \
         run REBOUND_UPDATE_OPENAPI=1 cargo test -p rebound-server --test openapi and commit the file"
    );
    // Every operation but health and enrolment needs the bearer token.
    let spec: serde_json::Value = serde_json::from_str(&generated).unwrap();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let open = path.ends_with("/health") || path.ends_with("/enrol");
            assert_eq!(op.get("security").is_none(), open, "{method} {path}");
        }
    }
}
