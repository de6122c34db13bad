//! Holds the server to `openapi.yaml`: every documented operation is routed and succeeds with
//! its example body, undocumented methods are refused, every documented field is accepted,
//! and GET answers contain exactly the documented properties.

mod support;

use std::path::Path;

use serde_json::{Map, Value};
use support::{send, FakeVmm, Scratch};

const METHODS: [&str; 3] = ["get", "put", "patch"];

fn spec() -> Value {
    let text = include_str!("../openapi.yaml");
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("openapi.yaml does not parse: {e}"))
}

/// Follows `$ref`s (only local `#/...` ones are used) until a concrete schema is reached.
fn resolve<'a>(spec: &'a Value, mut node: &'a Value) -> &'a Value {
    for _ in 0..16 {
        let Some(reference) = node.get("$ref").and_then(Value::as_str) else {
            return node;
        };
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {reference}"));
        node = spec
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {reference}"));
    }
    panic!("$ref loop at {node}");
}

/// Checks `value` against the subset of JSON Schema the document uses; returns what is wrong.
fn check(spec: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    let kind = schema.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "object" => {
            let Some(object) = value.as_object() else {
                errors.push(format!("{at}: expected an object, got {value}"));
                return;
            };
            let properties = schema
                .get("properties")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            for required in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = required.as_str().unwrap_or_default();
                if !object.contains_key(name) {
                    errors.push(format!("{at}: required property {name} is missing"));
                }
            }
            if let Some(min) = schema.get("minProperties").and_then(Value::as_u64) {
                if (object.len() as u64) < min {
                    errors.push(format!("{at}: fewer than {min} properties"));
                }
            }
            // A free-form object (the metadata document) declares `additionalProperties: true`.
            let free_form = schema.get("additionalProperties") == Some(&Value::Bool(true));
            for (name, item) in object {
                match properties.get(name) {
                    Some(property) => check(spec, property, item, &format!("{at}.{name}"), errors),
                    None if free_form => {}
                    None => errors.push(format!("{at}: property {name} is not documented")),
                }
            }
        }
        "array" => {
            let Some(items) = value.as_array() else {
                errors.push(format!("{at}: expected an array, got {value}"));
                return;
            };
            let item_schema = schema.get("items").unwrap_or(&Value::Null);
            for (i, item) in items.iter().enumerate() {
                check(spec, item_schema, item, &format!("{at}[{i}]"), errors);
            }
        }
        "string" => {
            let Some(text) = value.as_str() else {
                errors.push(format!("{at}: expected a string, got {value}"));
                return;
            };
            if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
                if !allowed.iter().any(|a| a.as_str() == Some(text)) {
                    errors.push(format!("{at}: {text:?} is not one of {allowed:?}"));
                }
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
                if (text.len() as u64) < min {
                    errors.push(format!("{at}: shorter than {min}"));
                }
            }
        }
        "integer" => {
            let Some(number) = value.as_i64() else {
                errors.push(format!("{at}: expected an integer, got {value}"));
                return;
            };
            if let Some(min) = schema.get("minimum").and_then(Value::as_i64) {
                if number < min {
                    errors.push(format!("{at}: {number} is below the minimum {min}"));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_i64) {
                if number > max {
                    errors.push(format!("{at}: {number} is above the maximum {max}"));
                }
            }
        }
        "boolean" => {
            if !value.is_boolean() {
                errors.push(format!("{at}: expected a boolean, got {value}"));
            }
        }
        other => errors.push(format!(
            "{at}: schema has unsupported type {other:?}: {schema}"
        )),
    }
}

fn assert_matches(spec: &Value, schema: &Value, value: &Value, at: &str) {
    let mut errors = Vec::new();
    check(spec, schema, value, at, &mut errors);
    assert!(
        errors.is_empty(),
        "{at} does not match its schema:\n{}\nvalue: {value}",
        errors.join("\n")
    );
}

/// Every (path, method, operation) in the document.
fn operations(spec: &Value) -> Vec<(String, String, Value)> {
    let paths = spec["paths"].as_object().expect("paths");
    let mut out = Vec::new();
    for (path, item) in paths {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                out.push((path.clone(), method.to_uppercase(), operation.clone()));
            }
        }
        for key in item.as_object().expect("path item").keys() {
            assert!(
                METHODS.contains(&key.as_str()) || key == "parameters",
                "{path}: unexpected key {key}"
            );
        }
    }
    out
}

/// The path with its parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("{drive_id}", "rootfs")
        .replace("{iface_id}", "eth0")
}

/// The operation's request body schema and example, if it takes a body.
fn request_body(operation: &Value) -> Option<(&Value, &Value)> {
    let media = operation.pointer("/requestBody/content/application~1json")?;
    Some((&media["schema"], &media["example"]))
}

/// Replaces host paths in a body with files that exist, so that checks of the files pass.
fn with_real_files(body: &Value, scratch: &Scratch) -> Value {
    let mut body = body.clone();
    if let Some(object) = body.as_object_mut() {
        for (name, value) in object.iter_mut() {
            if name.ends_with("_path") || name == "path_on_host" {
                let file = scratch.file(&format!("file-{name}"), &[0u8; 512]);
                *value = Value::from(file.display().to_string());
            }
        }
    }
    body
}

/// A body with every documented property set to a valid value.
fn maximal_body(spec: &Value, schema: &Value, scratch: &Scratch) -> Value {
    let schema = resolve(spec, schema);
    let mut body = Map::new();
    let no_properties = Map::new();
    let properties = match schema.get("properties") {
        Some(properties) => properties.as_object().expect("properties is an object"),
        // A free-form object has no documented fields to fill in.
        None => &no_properties,
    };
    for (name, property) in properties {
        let property = resolve(spec, property);
        let value = if let Some(first) = property.get("enum").and_then(|e| e.get(0)) {
            first.clone()
        } else {
            match property["type"].as_str() {
                Some("boolean") => Value::from(false),
                Some("integer") => match name.as_str() {
                    "mem_size_mib" => Value::from(128),
                    _ => property.get("minimum").cloned().unwrap_or(Value::from(1)),
                },
                Some("string") => Value::from(match name.as_str() {
                    "boot_args" => "console=ttyS0",
                    "iface_id" => "eth0",
                    "host_dev_name" => "tap0",
                    "guest_mac" => "06:00:AC:10:00:02",
                    "ipv4_address" => "169.254.169.254",
                    _ => "rootfs",
                }),
                Some("object") => maximal_body(spec, property, scratch),
                Some("array") => match name.as_str() {
                    "network_interfaces" => Value::from(vec!["eth0"]),
                    _ => Value::Array(Vec::new()),
                },
                other => panic!("{name}: no sample for type {other:?}"),
            }
        };
        body.insert(name.clone(), value);
    }
    with_real_files(&Value::Object(body), scratch)
}

fn success_code(operation: &Value) -> &'static str {
    let responses = operation["responses"].as_object().expect("responses");
    match (responses.contains_key("200"), responses.contains_key("204")) {
        (true, false) => "200",
        (false, true) => "204",
        _ => panic!("an operation must document exactly one of 200 and 204: {operation}"),
    }
}

#[test]
fn document_is_well_formed() {
    let spec = spec();
    assert!(spec["openapi"]
        .as_str()
        .expect("openapi")
        .starts_with("3.0"));
    assert_eq!(spec["info"]["version"], env!("CARGO_PKG_VERSION"));
    let operations = operations(&spec);
    assert_eq!(
        operations.len(),
        21,
        "{:?}",
        operations
            .iter()
            .map(|(p, m, _)| format!("{m} {p}"))
            .collect::<Vec<_>>()
    );
    for (path, method, operation) in &operations {
        assert!(
            operation["operationId"].is_string(),
            "{method} {path}: operationId"
        );
        assert!(operation["summary"].is_string(), "{method} {path}: summary");
        // Every operation can be refused (bad body, unknown field, wrong state...).
        let bad = resolve(&spec, &operation["responses"]["400"]);
        let schema = bad
            .pointer("/content/application~1json/schema")
            .expect("400 schema");
        assert_eq!(
            resolve(&spec, schema),
            &spec["components"]["schemas"]["Error"]
        );
        let _ = success_code(operation);
        if method == "GET" {
            assert!(
                operation.get("requestBody").is_none(),
                "{method} {path} takes no body"
            );
        } else {
            let (schema, example) = request_body(operation)
                .unwrap_or_else(|| panic!("{method} {path}: no JSON request body"));
            assert_eq!(
                operation["requestBody"]["required"], true,
                "{method} {path}"
            );
            assert_matches(&spec, schema, example, &format!("{method} {path} example"));
        }
    }
    // Enum values that YAML could read as booleans or null must have stayed strings.
    assert_eq!(
        spec.pointer("/components/schemas/Logger/properties/level/enum/0"),
        Some(&Value::from("Off"))
    );
    assert_eq!(
        spec.pointer("/components/schemas/MachineConfiguration/properties/cpu_template/enum/0"),
        Some(&Value::from("None"))
    );
}

#[test]
fn every_documented_operation_is_routed_and_accepts_its_example() {
    let spec = spec();
    let scratch = Scratch::new("openapi-routes");
    let socket = scratch.socket();
    let vmm = FakeVmm::start(&socket);
    for (path, method, operation) in operations(&spec) {
        let body = request_body(&operation)
            .map(|(_, example)| with_real_files(example, &scratch).to_string());
        let reply = send(&socket, &method, &concrete(&path), body.as_deref());
        let expected: u16 = success_code(&operation).parse().expect("status");
        assert_eq!(
            reply.status, expected,
            "{method} {path} with {body:?} answered {}: {}",
            reply.status, reply.body
        );
        assert_eq!(reply.header("content-type"), Some("application/json"));
    }
    // Each documented operation but GET /version reached the VMM.
    assert_eq!(
        vmm.received().len(),
        operations(&spec).len() - 1,
        "{:?}",
        vmm.received()
    );
}

#[test]
fn every_documented_property_is_accepted() {
    let spec = spec();
    let scratch = Scratch::new("openapi-props");
    let socket = scratch.socket();
    let _vmm = FakeVmm::start(&socket);
    for (path, method, operation) in operations(&spec) {
        let Some((schema, _)) = request_body(&operation) else {
            continue;
        };
        let body = maximal_body(&spec, schema, &scratch);
        assert_matches(
            &spec,
            schema,
            &body,
            &format!("{method} {path} maximal body"),
        );
        let reply = send(&socket, &method, &concrete(&path), Some(&body.to_string()));
        assert_eq!(
            reply.status, 204,
            "{method} {path} refused a body with every documented field {body}: {}",
            reply.body
        );
    }
}

#[test]
fn undocumented_methods_are_refused() {
    let spec = spec();
    let scratch = Scratch::new("openapi-methods");
    let socket = scratch.socket();
    let _vmm = FakeVmm::start(&socket);
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in ["GET", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"] {
            if item.get(method.to_lowercase()).is_some() {
                continue;
            }
            let concrete = concrete(path);
            let body = if method == "GET" { None } else { Some("{}") };
            let reply = send(&socket, method, &concrete, body);
            assert_eq!(reply.status, 400, "{method} {path}: {}", reply.body);
            assert_eq!(
                reply.fault(),
                format!("Invalid request method and/or path: {method} {concrete}."),
            );
        }
    }
}

#[test]
fn answers_contain_exactly_the_documented_properties() {
    let spec = spec();
    let scratch = Scratch::new("openapi-gets");
    let socket = scratch.socket();
    let _vmm = FakeVmm::start(&socket);
    for (path, method, operation) in operations(&spec) {
        if method != "GET" {
            continue;
        }
        let schema = operation
            .pointer("/responses/200/content/application~1json/schema")
            .unwrap_or_else(|| panic!("GET {path}: no 200 schema"));
        let reply = send(&socket, "GET", &concrete(&path), None);
        assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
        assert_matches(&spec, schema, &reply.json(), &format!("GET {path}"));
    }
    // Errors have the documented shape too.
    let error_schema = &spec["components"]["schemas"]["Error"];
    let reply = send(&socket, "GET", "/undocumented", None);
    assert_matches(&spec, error_schema, &reply.json(), "an error");
    let reply = send(
        &socket,
        "PUT",
        "/logger",
        Some(r#"{"log_path":"/fail/internal"}"#),
    );
    assert_eq!(reply.status, 500);
    assert_matches(&spec, error_schema, &reply.json(), "an internal error");
}

#[test]
fn the_fake_vmm_config_covers_every_documented_vm_config_section() {
    // Guards the test above: it only proves something if the answers it checks use every
    // documented property.
    let spec = spec();
    let config = serde_json::to_value(support::full_vm_config()).expect("serialize");
    let documented = spec["components"]["schemas"]["FullVmConfiguration"]["properties"]
        .as_object()
        .expect("properties");
    for name in documented.keys() {
        assert!(
            config.get(name).is_some(),
            "the fake VMM's config lacks {name}"
        );
    }
    let drive = &config["drives"][0];
    for name in spec["components"]["schemas"]["Drive"]["properties"]
        .as_object()
        .expect("properties")
        .keys()
    {
        assert!(
            drive.get(name).is_some(),
            "the fake VMM's drive lacks {name}"
        );
    }
    assert!(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("openapi.yaml")
        .is_file());
}
