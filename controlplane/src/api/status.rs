//! Errors as the Kubernetes API reports them: an HTTP code and a `Status` body whose reason,
//! message and causes clients (kubectl, client-go, the Python client) print.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::store::StoreError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

/// One invalid field, for 422 Invalid.
#[derive(Debug, Clone)]
pub struct FieldError {
    pub field: String,
    /// Kubernetes' cause type, e.g. FieldValueInvalid, FieldValueRequired.
    pub kind: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn invalid(field: impl Into<String>, value: impl std::fmt::Display, why: &str) -> Self {
        FieldError {
            field: field.into(),
            kind: "FieldValueInvalid",
            message: format!("Invalid value: {value}: {why}"),
        }
    }
    pub fn required(field: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            kind: "FieldValueRequired",
            message: "Required value".into(),
        }
    }
    pub fn required_why(field: impl Into<String>, why: &str) -> Self {
        FieldError {
            field: field.into(),
            kind: "FieldValueRequired",
            message: format!("Required value: {why}"),
        }
    }
    pub fn unsupported(field: impl Into<String>, value: &str, allowed: &[&str]) -> Self {
        let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
        FieldError {
            field: field.into(),
            kind: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: \"{value}\": supported values: {}",
                list.join(", ")
            ),
        }
    }
    pub fn duplicate(field: impl Into<String>, value: impl std::fmt::Display) -> Self {
        FieldError {
            field: field.into(),
            kind: "FieldValueDuplicate",
            message: format!("Duplicate value: {value}"),
        }
    }
    pub fn forbidden(field: impl Into<String>, why: &str) -> Self {
        FieldError {
            field: field.into(),
            kind: "FieldValueForbidden",
            message: format!("Forbidden: {why}"),
        }
    }
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }
    pub fn not_found(resource: &str, group: &str, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(resource, group)),
        );
        e.details = Some(json!({"name": name, "group": group, "kind": resource}));
        e
    }
    pub fn already_exists(resource: &str, group: &str, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(resource, group)),
        );
        e.details = Some(json!({"name": name, "group": group, "kind": resource}));
        e
    }
    pub fn conflict(resource: &str, group: &str, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                qualified(resource, group)
            ),
        );
        e.details = Some(json!({"name": name, "group": group, "kind": resource}));
        e
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }
    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit} bytes"),
        )
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }
    /// 422 Invalid: `Kind "name" is invalid: [field: message, ...]`, with one cause per field.
    pub fn invalid(kind: &str, group: &str, name: &str, errs: Vec<FieldError>) -> Self {
        let parts: Vec<String> = errs
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        let joined = if parts.len() == 1 {
            parts[0].clone()
        } else {
            format!("[{}]", parts.join(", "))
        };
        let causes: Vec<Value> = errs
            .iter()
            .map(|e| json!({"reason": e.kind, "message": e.message, "field": e.field}))
            .collect();
        let mut err = Self::new(
            422,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {joined}"),
        );
        err.details = Some(json!({"name": name, "group": group, "kind": kind, "causes": causes}));
        err
    }

    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

fn qualified(resource: &str, group: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self.to_status()).unwrap_or_default();
        (
            code,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Compacted { .. } => ApiError::gone(format!(
                "The resourceVersion for the provided list is too old: {e}"
            )),
            StoreError::FutureRevision { .. } => {
                let mut err =
                    ApiError::new(504, "Timeout", format!("Too large resource version: {e}"));
                err.details = Some(
                    json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
                );
                err
            }
            other => ApiError::internal(format!("storage: {other}")),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
