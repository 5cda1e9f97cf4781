//! The answers every operation can give besides its own, written into the spec in one place so that none
//! is left out: the boundary's refusals (a query, path or body that does not parse, a body that is too big
//! or not JSON, text with a NUL), the token's, the timeouts, an unavailable database and an internal error.
//! A handler's own description of one of these statuses is kept.
//!
//! Tenant ids follow one rule everywhere (`domain::TenantId`), so the rule is written onto every
//! `tenant_id` here too rather than beside each of the twenty fields that carry one.

use serde_json::{Value, json};

/// `domain::TenantId`'s rule as JSON Schema.
const TENANT_PATTERN: &str = "^[A-Za-z0-9._@-]+$";
const TENANT_MAX: u64 = 128;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// Routes that answer without the database.
const WITHOUT_DATABASE: [&str; 2] = ["/health", "/metrics"];

/// The spec with the shared answers and rules added.
pub(super) fn complete(spec: utoipa::openapi::OpenApi) -> Value {
    let mut value = serde_json::to_value(&spec).expect("the spec serialises");
    if let Some(paths) = value.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            for method in METHODS {
                if let Some(operation) = item.get_mut(method) {
                    add_shared_answers(path, operation);
                    for parameter in operation
                        .get_mut("parameters")
                        .and_then(Value::as_array_mut)
                        .into_iter()
                        .flatten()
                    {
                        if parameter["name"] == "tenant_id"
                            && let Some(schema) = parameter.get_mut("schema")
                        {
                            tenant_rule(schema);
                        }
                    }
                }
            }
        }
    }
    if let Some(schemas) = value
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for schema in schemas.values_mut() {
            if let Some(tenant) = schema.pointer_mut("/properties/tenant_id") {
                tenant_rule(tenant);
            }
        }
        for name in ["DeadFilter", "CancelFilter"] {
            if let Some(filter) = schemas.get_mut(name) {
                narrows_or_confirms(filter);
            }
        }
    }
    value
}

fn add_shared_answers(path: &str, operation: &mut Value) {
    let takes_input = operation
        .get("parameters")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty());
    let takes_body = operation.get("requestBody").is_some();
    let secured = operation.get("security").is_some();
    let mut answers: Vec<(u16, &str)> = Vec::new();
    if takes_input || takes_body {
        answers.push((
            400,
            "A path, query or body value that does not parse as its type (the message names it)",
        ));
        answers.push((
            422,
            "A value this service does not accept, or text with a NUL character (the message names the field)",
        ));
    }
    if takes_body {
        answers.push((413, "The body is larger than ACTIVEKG_MAX_BODY_BYTES"));
        answers.push((415, "The body is not JSON"));
    }
    if secured {
        answers.push((401, "No token, or not the server's ADMIN_TOKEN"));
        answers.push((
            403,
            "The server has no ADMIN_TOKEN, so its admin API refuses everyone",
        ));
    }
    answers.push((
        408,
        "The request took longer than ACTIVEKG_HTTP_REQUEST_TIMEOUT_SECONDS (or its body longer than \
         ACTIVEKG_HTTP_BODY_TIMEOUT_SECONDS)",
    ));
    if !WITHOUT_DATABASE.contains(&path) {
        answers.push((503, "The database is unavailable; retry shortly"));
    }
    answers.push((500, "An internal error; it is logged with the request's id"));
    let responses = operation
        .as_object_mut()
        .expect("an operation is an object")
        .entry("responses")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("responses are an object");
    for (status, description) in answers {
        responses.entry(status.to_string()).or_insert_with(|| {
            json!({
                "description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
            })
        });
    }
}

/// A bulk action needs a filter that narrows it, or `all: true` (see `jobs::DeadFilter`); a
/// derive cannot say "at least one of", so it is said here.
fn narrows_or_confirms(schema: &mut Value) {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    let mut choices: Vec<Value> = [
        "queue",
        "kind",
        "tenant_id",
        "state",
        "since",
        "until",
        "ids",
    ]
    .into_iter()
    .filter_map(|name| {
        let mut given = properties.get(name)?.clone();
        // A null narrows nothing (utoipa writes an optional field as a type list or a oneOf).
        if let Some(types) = given.get_mut("type").and_then(Value::as_array_mut) {
            types.retain(|t| t != "null");
        }
        if let Some(choices) = given.get_mut("oneOf").and_then(Value::as_array_mut) {
            choices.retain(|c| c.get("type").is_none_or(|t| t != "null"));
        }
        Some(json!({"required": [name], "properties": {name: given}}))
    })
    .collect();
    choices.push(json!({"required": ["all"], "properties": {"all": {"const": true}}}));
    schema["anyOf"] = Value::Array(choices);
}

fn tenant_rule(schema: &mut Value) {
    if let Some(schema) = schema.as_object_mut() {
        schema.insert("minLength".to_owned(), json!(1));
        schema.insert("maxLength".to_owned(), json!(TENANT_MAX));
        schema.insert("pattern".to_owned(), json!(TENANT_PATTERN));
    }
}
