//! Cloud Hypervisor's error answers: a non-2xx status with a JSON array of strings, the
//! outermost cause first (`["Error from API", "The VM could not be booted", "VM is not
//! created"]`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChError {
    pub status: StatusCode,
    pub causes: Vec<String>,
}

impl ChError {
    /// A refused or failed API action (HTTP 500): `what` is the action's failure ("The VM
    /// could not be booted"), `chain` the inner causes.
    pub fn api(what: &str, chain: Vec<String>) -> Self {
        let mut causes = vec!["Error from API".to_owned(), what.to_owned()];
        causes.extend(chain);
        ChError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            causes,
        }
    }

    /// A body that does not deserialize (HTTP 400).
    pub fn bad_request(cause: String) -> Self {
        ChError {
            status: StatusCode::BAD_REQUEST,
            causes: vec!["Could not deserialize JSON body".to_owned(), cause],
        }
    }
}

impl IntoResponse for ChError {
    fn into_response(self) -> Response {
        (self.status, Json(self.causes)).into_response()
    }
}
