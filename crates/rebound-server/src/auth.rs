//! Bearer-token authentication and scopes. Tokens are looked up by their
//! hash; a missing or unknown token gets 401, a token whose scope does not
//! allow the request gets 403, and neither changes anything.

use crate::AppState;
use crate::error::AppError;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rebound_api::Scope;
use rebound_types::ErrorCode;

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: String,
    pub scope: Scope,
    /// For component tokens: the component they belong to.
    pub component_id: Option<String>,
}

impl Caller {
    /// Refuse unless the caller's scope is one of `scopes` (admin always passes).
    pub fn require(&self, scopes: &[Scope]) -> Result<(), AppError> {
        if self.scope == Scope::Admin || scopes.contains(&self.scope) {
            Ok(())
        } else {
            Err(AppError::new(
                ErrorCode::Forbidden,
                format!("a token of scope {} may not do this", self.scope),
            ))
        }
    }

    /// Reads of the configuration: people's tokens.
    pub fn require_reader(&self) -> Result<(), AppError> {
        self.require(&[Scope::Operator, Scope::Viewer])
    }

    /// Reads a component needs to do its work (its item, its jobs, its
    /// peers' addresses): people's tokens and component tokens.
    pub fn require_reader_or_component(&self) -> Result<(), AppError> {
        self.require(&[
            Scope::Operator,
            Scope::Viewer,
            Scope::Agent,
            Scope::ProcessServer,
            Scope::MasterTarget,
        ])
    }

    /// Portal actions and configuration changes.
    pub fn require_operator(&self) -> Result<(), AppError> {
        self.require(&[Scope::Operator])
    }

    /// The component itself (its token), and nobody else except admin.
    pub fn require_component(&self, id: &str) -> Result<(), AppError> {
        if self.scope == Scope::Admin || self.component_id.as_deref() == Some(id) {
            Ok(())
        } else {
            Err(AppError::new(
                ErrorCode::Forbidden,
                format!("only component {id}'s own token may do this"),
            ))
        }
    }
}

fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(axum::http::header::AUTHORIZATION)?;
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        let token = token.trim();
        (!token.is_empty()).then_some(token)
    } else {
        None
    }
}

pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(token) = bearer(&req) else {
        return AppError::new(
            ErrorCode::Unauthorised,
            "this endpoint needs an `Authorization: Bearer TOKEN` header",
        )
        .into_response();
    };
    match state.store.token_by_secret(token).await {
        Ok(Some((info, component_id))) => {
            req.extensions_mut().insert(Caller {
                token_id: info.id,
                scope: info.scope,
                component_id,
            });
            next.run(req).await
        }
        Ok(None) => {
            AppError::new(ErrorCode::Unauthorised, "unknown or revoked token").into_response()
        }
        Err(e) => AppError::from(e).into_response(),
    }
}
