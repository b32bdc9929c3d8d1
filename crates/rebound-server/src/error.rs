//! The API's one error shape, `{code, message, remedy}`, with the HTTP status
//! chosen from the code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rebound_api::{ApiError, Failure};
use rebound_store::StoreError;
use rebound_types::{Coded, ErrorCode};

#[derive(Debug)]
pub struct AppError(pub ApiError);

pub type AppResult<T> = Result<T, AppError>;

impl AppError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> AppError {
        AppError(ApiError::new(code, message))
    }

    pub fn prechecks(failures: Vec<Failure>) -> AppError {
        let mut e = ApiError::new(
            ErrorCode::PrechecksFailed,
            format!("{} precheck(s) failed", failures.len()),
        );
        e.failures = failures;
        AppError(e)
    }

    pub fn status(&self) -> StatusCode {
        status_of(ErrorCode::from_number(self.0.code))
    }
}

pub fn status_of(code: Option<ErrorCode>) -> StatusCode {
    use ErrorCode as C;
    match code {
        Some(C::Unauthorised) | Some(C::RegistrationKeyInvalid) => StatusCode::UNAUTHORIZED,
        Some(C::Forbidden) => StatusCode::FORBIDDEN,
        Some(C::InvalidRequest) | Some(C::InvalidArgument) => StatusCode::BAD_REQUEST,
        Some(C::ItemUnknown) | Some(C::NotFound) | Some(C::JobNotFound) => StatusCode::NOT_FOUND,
        Some(C::ActionNotAllowed)
        | Some(C::ItemBusy)
        | Some(C::AlreadyExists)
        | Some(C::PolicyReadOnly)
        | Some(C::JobFinished) => StatusCode::CONFLICT,
        Some(C::StoreUnavailable) | Some(C::BackupFailed) | None => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        // Prechecks and the conditions they report.
        Some(_) => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(code = self.0.code, message = %self.0.message, "request failed");
        }
        (status, axum::Json(self.0)).into_response()
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> AppError {
        AppError::new(e.code(), e.to_string())
    }
}

impl From<ApiError> for AppError {
    fn from(e: ApiError) -> AppError {
        AppError(e)
    }
}
