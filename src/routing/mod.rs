//! Which upstream serves a request: the first route whose method, path template and headers
//! match, else the default upstream under the route name `default`. A split picks among its
//! upstreams by weight — by a hash of the sticky header or cookie when one is set and present,
//! so a user stays on one side, else at random. The [`Target`] travels down the stack so that
//! metrics, logs and events name the route and upstream.
//!
//! The decision allocates nothing: path matching is done on the borrowed path, the sticky key
//! is hashed in place.

use http::{HeaderMap, Method, Uri};

use crate::config::routes::{Backend, Fallback, RouteConfig, Shadow, Sticky};

/// The route name used for traffic that no route matched.
pub const DEFAULT_ROUTE: &str = "default";

/// Where one request goes: indexes into the routes and the upstream clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub route: usize,
    pub upstream: usize,
}

#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<RouteConfig>,
    default_upstream: usize,
}

impl Router {
    pub fn new(routes: Vec<RouteConfig>, default_upstream: usize) -> Router {
        Router {
            routes,
            default_upstream,
        }
    }

    /// The route index `routes.len()` stands for the default route.
    pub fn route(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Target {
        let path = uri.path();
        for (i, r) in self.routes.iter().enumerate() {
            if r.method.as_ref().is_some_and(|m| m != method) {
                continue;
            }
            if !r.path.matches(path) {
                continue;
            }
            if !r.headers.iter().all(|(n, v)| headers.get(n) == Some(v)) {
                continue;
            }
            let upstream = match &r.backend {
                Backend::Single(u) => *u,
                Backend::Split { choices, sticky } => pick(choices, sticky.as_ref(), headers),
            };
            return Target { route: i, upstream };
        }
        Target {
            route: self.routes.len(),
            upstream: self.default_upstream,
        }
    }

    pub fn route_name(&self, target: Target) -> &str {
        self.routes
            .get(target.route)
            .map_or(DEFAULT_ROUTE, |r| r.name.as_str())
    }

    /// Route names in index order, the default last: the `route` label values.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .map(|r| r.name.as_str())
            .chain(std::iter::once(DEFAULT_ROUTE))
    }

    pub fn config(&self, target: Target) -> Option<&RouteConfig> {
        self.routes.get(target.route)
    }

    pub fn fallback(&self, target: Target) -> Option<&Fallback> {
        self.config(target).and_then(|r| r.fallback.as_ref())
    }

    pub fn shadow(&self, target: Target) -> Option<&Shadow> {
        self.config(target).and_then(|r| r.shadow.as_ref())
    }
}

/// Weighted choice: by the sticky key's hash when present, so the same key always lands on
/// the same upstream while the weights stay; else random.
///
/// The key's hash is read as a fraction of the total weight (not taken modulo it), so that
/// scaling every weight alike moves nobody, and raising the share of the last choice (a canary
/// ramp from 10 to 50) only moves keys onto it: a user who already saw the new side stays there.
fn pick(choices: &[(usize, u32)], sticky: Option<&Sticky>, headers: &HeaderMap) -> usize {
    let total: u64 = choices.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return choices.first().map_or(0, |(u, _)| *u);
    }
    let point = match sticky.and_then(|s| sticky_key(s, headers)) {
        // The product of a u64 and a u32-sum over 2^64 is below `total`: never out of range.
        Some(key) => ((u128::from(stable_hash(key)) * u128::from(total)) >> 64) as u64,
        None => fastrand::u64(0..total),
    };
    let mut acc = 0u64;
    for (u, w) in choices {
        acc += u64::from(*w);
        if point < acc {
            return *u;
        }
    }
    choices.last().map_or(0, |(u, _)| *u)
}

/// FNV-1a with a SplitMix64 finaliser: the same value in every ficus process and every build.
/// Each pod runs its own sidecar, so a user whose requests reach different pods (or a pod
/// restarted on a newer ficus) must still land on the same side; std's `DefaultHasher` makes
/// no such promise across releases.
fn stable_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn sticky_key<'a>(sticky: &Sticky, headers: &'a HeaderMap) -> Option<&'a [u8]> {
    match sticky {
        Sticky::Header(name) => headers.get(name).map(|v| v.as_bytes()),
        Sticky::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then_some(v.as_bytes())
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::PathTemplate;

    fn route(name: &str, method: Option<Method>, path: &str, backend: Backend) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            method,
            path: PathTemplate::parse(path).expect("path"),
            headers: Vec::new(),
            backend,
            fallback: None,
            shadow: None,
            strip_prefix: None,
            add_prefix: None,
        }
    }

    #[test]
    fn first_matching_route_wins_else_default() {
        let mut canary = route("canary", None, "/orders/{id}", Backend::Single(2));
        canary.headers.push((
            http::HeaderName::from_static("x-canary"),
            http::HeaderValue::from_static("1"),
        ));
        let router = Router::new(
            vec![
                canary,
                route(
                    "read",
                    Some(Method::GET),
                    "/orders/{id}",
                    Backend::Single(1),
                ),
                route("all", None, "/orders/{*rest}", Backend::Single(3)),
            ],
            0,
        );
        let uri = Uri::from_static("/orders/7?x=1");
        let mut h = HeaderMap::new();
        assert_eq!(
            router.route(&Method::GET, &uri, &h),
            Target {
                route: 1,
                upstream: 1
            }
        );
        assert_eq!(
            router.route(&Method::POST, &uri, &h),
            Target {
                route: 2,
                upstream: 3
            }
        );
        h.insert("x-canary", http::HeaderValue::from_static("1"));
        assert_eq!(
            router.route(&Method::GET, &uri, &h),
            Target {
                route: 0,
                upstream: 2
            }
        );
        let t = router.route(&Method::GET, &Uri::from_static("/search"), &h);
        assert_eq!(
            t,
            Target {
                route: 3,
                upstream: 0
            }
        );
        assert_eq!(router.route_name(t), "default");
    }

    #[test]
    fn sticky_split_keeps_a_key_on_one_side() {
        let choices = [(0, 50), (1, 50)];
        let sticky = Sticky::Cookie("uid".into());
        let mut sides = std::collections::HashSet::new();
        for user in 0..200 {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::COOKIE,
                http::HeaderValue::from_str(&format!("a=b; uid=u{user}")).expect("value"),
            );
            let first = pick(&choices, Some(&sticky), &h);
            for _ in 0..5 {
                assert_eq!(pick(&choices, Some(&sticky), &h), first);
            }
            sides.insert(first);
        }
        assert_eq!(sides.len(), 2, "keys spread over both sides");
    }

    #[test]
    fn sticky_hash_is_fixed_across_builds() {
        // Pinned values: a change here re-shuffles every sticky user on upgrade.
        assert_eq!(stable_hash(b""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(stable_hash(b"user-1"), 0xc499_b5f8_a721_df58);
    }

    #[test]
    fn ramping_the_canary_up_only_moves_users_onto_it() {
        let sticky = Sticky::Header(http::HeaderName::from_static("x-user-id"));
        let side = |weights: [u32; 2], user: usize| {
            let mut h = HeaderMap::new();
            h.insert(
                "x-user-id",
                http::HeaderValue::from_str(&format!("u{user}")).expect("value"),
            );
            pick(&[(0, weights[0]), (1, weights[1])], Some(&sticky), &h)
        };
        let mut on_canary = [0usize; 4];
        for user in 0..2000 {
            let steps = [[90, 10], [80, 20], [50, 50], [5, 5]].map(|w| side(w, user));
            for (i, s) in steps.iter().enumerate() {
                on_canary[i] += s;
            }
            assert!(
                steps[0] <= steps[1] && steps[1] <= steps[2],
                "u{user} moved back"
            );
            assert_eq!(
                steps[2], steps[3],
                "u{user} moved when the weights were scaled"
            );
        }
        // Binomial(2000, p): 5 sd is at most 112.
        for (n, p) in on_canary.iter().zip([0.1, 0.2, 0.5, 0.5]) {
            assert!((*n as f64 - 2000.0 * p).abs() < 112.0, "{on_canary:?}");
        }
    }

    #[test]
    fn zero_weight_never_chosen() {
        let h = HeaderMap::new();
        for _ in 0..1000 {
            assert_eq!(pick(&[(0, 0), (1, 5)], None, &h), 1);
        }
    }
}
