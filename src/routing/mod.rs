//! Which upstream serves a request. This version has no `routes` section yet: every request
//! goes to the default upstream under the route name `default`. The [`Target`] a request gets
//! here travels down the stack so that metrics and logs name the route and upstream.

use http::{Method, Uri};

/// The route name used for traffic that no route matched.
pub const DEFAULT_ROUTE: &str = "default";

/// Where one request goes: indexes into the route names and the upstream clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub route: usize,
    pub upstream: usize,
}

#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<String>,
    default_upstream: usize,
}

impl Router {
    pub fn new(default_upstream: usize) -> Router {
        Router {
            routes: vec![DEFAULT_ROUTE.to_string()],
            default_upstream,
        }
    }

    pub fn route(&self, _method: &Method, _uri: &Uri) -> Target {
        Target {
            route: 0,
            upstream: self.default_upstream,
        }
    }

    pub fn route_name(&self, target: Target) -> &str {
        self.routes
            .get(target.route)
            .map_or(DEFAULT_ROUTE, String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unrouted_traffic_goes_to_the_default_upstream() {
        let router = Router::new(1);
        let t = router.route(&Method::POST, &Uri::from_static("/orders?x=1"));
        assert_eq!(t.upstream, 1);
        assert_eq!(router.route_name(t), "default");
    }
}
