//! The label values metrics and the access log share: why portier answered a request
//! itself, which way spooled bytes went, why a request was sent again.

/// Why portier answered a request itself (the access log's `refused`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    UnknownHost,
    RateLimited,
    ConcurrencyLimited,
    BodyTooLarge,
    DatabaseManager,
    NoBackend,
    BadRequest,
    QueueFull,
    QueueTimeout,
    Maintenance,
    LoginLimited,
    HeaderTimeout,
    FilestoreDenied,
    FilestoreMissing,
    FilestoreUnset,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownHost => "unknown_host",
            Refusal::RateLimited => "rate_limited",
            Refusal::ConcurrencyLimited => "concurrency_limited",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::DatabaseManager => "database_manager",
            Refusal::NoBackend => "no_backend",
            Refusal::BadRequest => "bad_request",
            Refusal::QueueFull => "queue_full",
            Refusal::QueueTimeout => "queue_timeout",
            Refusal::Maintenance => "maintenance",
            Refusal::LoginLimited => "login_limited",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::FilestoreDenied => "filestore_denied",
            Refusal::FilestoreMissing => "filestore_missing",
            Refusal::FilestoreUnset => "filestore_unset",
        }
    }
}

/// Which way spooled bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// Why a request was sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The connection to the worker could not be made.
    Connect,
    /// The worker closed or reset the connection before any byte of its response.
    Closed,
    /// The worker answered 502, 503 or 504.
    Status,
    /// The worker said nothing for the request's timeout.
    Timeout,
}

impl Retry {
    pub const ALL: [Retry; 4] = [Retry::Connect, Retry::Closed, Retry::Status, Retry::Timeout];

    pub fn as_str(self) -> &'static str {
        match self {
            Retry::Connect => "connect",
            Retry::Closed => "closed",
            Retry::Status => "status",
            Retry::Timeout => "timeout",
        }
    }
}
