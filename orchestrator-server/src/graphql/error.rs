//! The errors a GraphQL request can get, each with a stable `extensions.code`.

use async_graphql::ErrorExtensions as _;

/// A request's failure, turned into a GraphQL error with a machine-readable code.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// `first` is over the server's page size cap.
    PageTooLarge { asked: usize, max: usize },
    /// An argument that cannot be used (a bad cursor, pattern or id).
    BadInput(String),
    /// The thing asked for does not exist.
    NotFound(String),
    /// A mutation on a read-only server.
    ReadOnly,
    /// The store, transport or dead-letter queue failed.
    Backend(String),
    /// A query that scans the store would read more than the server allows.
    ScanLimit { max: usize },
    /// A live subscriber fell more than the window behind the store's head.
    SlowConsumer {
        behind: u64,
        window: u64,
        resume_from: u64,
    },
}

impl ApiError {
    pub(crate) fn backend(error: impl std::fmt::Display) -> Self {
        Self::Backend(error.to_string())
    }

    fn code(&self) -> &'static str {
        match self {
            Self::PageTooLarge { .. } => "PAGE_TOO_LARGE",
            Self::BadInput(_) => "BAD_USER_INPUT",
            Self::NotFound(_) => "NOT_FOUND",
            Self::ReadOnly => "READ_ONLY",
            Self::Backend(_) => "BACKEND_ERROR",
            Self::ScanLimit { .. } => "SCAN_LIMIT",
            Self::SlowConsumer { .. } => "SLOW_CONSUMER",
        }
    }

    fn message(&self) -> String {
        match self {
            Self::PageTooLarge { asked, max } => format!(
                "a page of {asked} is over this server's limit of {max}: ask for at most {max} \
                 and follow `pageInfo.endCursor`"
            ),
            Self::BadInput(why) => why.clone(),
            Self::NotFound(what) => format!("{what} not found"),
            Self::ReadOnly => "this server is read-only: mutations are disabled".to_owned(),
            Self::Backend(why) => why.clone(),
            Self::ScanLimit { max } => format!(
                "this query scans the store and would read more than this server's limit of \
                 {max} events: use `events` with filters and pages instead"
            ),
            Self::SlowConsumer {
                behind,
                window,
                resume_from,
            } => format!(
                "this subscription fell {behind} events behind the store, more than this \
                 server's window of {window}: it ends here; subscribe again with \
                 `fromPosition: {resume_from}` to go on without a gap"
            ),
        }
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(error: ApiError) -> Self {
        let code = error.code();
        let max = match error {
            ApiError::PageTooLarge { max, .. } => Some(max),
            _ => None,
        };
        let resume_from = match error {
            ApiError::SlowConsumer { resume_from, .. } => Some(resume_from),
            _ => None,
        };
        async_graphql::Error::new(error.message()).extend_with(|_, extensions| {
            extensions.set("code", code);
            if let Some(max) = max {
                extensions.set("maxPageSize", max);
            }
            if let Some(position) = resume_from {
                extensions.set("resumeFrom", position);
            }
        })
    }
}

/// `Result` of a resolver.
pub(crate) type ApiResult<T> = std::result::Result<T, async_graphql::Error>;
