//! The policy engine: one immutable snapshot of schema, policies and entities, indexed by
//! action, that turns a tool call into a Cedar request and a fail-closed decision.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, Policy, PolicyId, PolicySet, PrincipalConstraint, Request,
    RestrictedExpression, Schema,
};
use chrono::{DateTime, Timelike, Utc};
use serde_json::{json, Map, Value};

use crate::load::{error_chain, load_dir, LoadError, Loaded, PolicySource};
use crate::reads::ArgReads;
use crate::schema_info::{AttrType, Record, SchemaInfo};

pub const NAMESPACE: &str = "Toolgate";

/// Who is calling, as authentication established it.
#[derive(Debug, Clone)]
pub struct Principal<'a> {
    pub id: &'a str,
    /// Claims that may fill the entity's schema-declared attributes.
    pub claims: &'a Map<String, Value>,
}

/// What the call is on.
#[derive(Debug, Clone)]
pub enum Resource<'a> {
    Tool { upstream: &'a str, tool: &'a str },
    Task { id: &'a str },
}

/// Environment attributes of a call.
#[derive(Debug, Clone, Copy)]
pub struct Env {
    pub source_ip: IpAddr,
    pub time: DateTime<Utc>,
}

#[derive(Debug, Clone, Default)]
pub struct TaskContext {
    pub id: String,
    pub intent: String,
    /// A human approved this action in the task.
    pub approved: bool,
    pub approved_by: Option<String>,
    /// The agent that started the task, and the user it acted for.
    pub owner: String,
    pub owner_user: Option<String>,
}

/// One authorization question, before it is typed by the schema.
#[derive(Debug, Clone)]
pub struct AuthzRequest<'a> {
    pub agent: Principal<'a>,
    pub user: Option<Principal<'a>>,
    /// The action id: `"<upstream>/<tool>"`, `"list"`, `"start_task"`, ...
    pub action: &'a str,
    pub resource: Resource<'a>,
    /// Raw arguments: strings from paths and queries, JSON from bodies; typed here.
    pub args: Map<String, Value>,
    pub env: Env,
    pub task: Option<TaskContext>,
    /// The `iss` of the token that authenticated the caller (`context.issuer` where declared).
    pub issuer: &'a str,
    /// A person's approval of exactly this call (`context.approval` where declared).
    pub approval: Option<ApprovalContext>,
    /// Usage counters' values before this call (`context.usage` where declared).
    pub usage: Option<Map<String, Value>>,
}

/// `context.approval`: who approved this call, when, and what they noted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApprovalContext {
    pub id: String,
    pub by: String,
    /// When it was approved (seconds since the epoch).
    pub at: u64,
    pub note: Option<String>,
}

/// The verdict. `allowed` is true only when Cedar allowed and nothing erred.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The determining policies: permits on allow, forbids on an explicit deny.
    pub policies: Vec<String>,
    pub errors: Vec<String>,
    /// `@grants` of the determining permit policies (empty on deny).
    pub grants: Vec<String>,
    /// What the `@mode("shadow")` policies would have made of it, when that differs.
    pub shadow: Option<ShadowDecision>,
    /// On a deny: the `@reason` of the first determining policy that has one, for the agent.
    pub reason: Option<String>,
    /// On a deny determined only by `@approval` forbids (nothing erred): the first one's text.
    /// A person may lift it for this one call.
    pub approval: Option<String>,
    /// On a deny (nothing erred) that a `@rate_limit` policy determined: a limit reached.
    pub rate_limited: bool,
}

/// The decision the enforced and the shadow policies together would make, where it differs
/// from the enforced one. It never decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowDecision {
    pub allowed: bool,
    /// Its determining policies, and the policies that erred (each erring policy denies).
    pub policies: Vec<String>,
    pub errors: Vec<String>,
    /// The shadow policies that make the difference: among its determining or erring ones.
    pub flipped_by: Vec<String>,
}

impl Decision {
    pub fn deny_with(error: String) -> Self {
        Decision {
            allowed: false,
            policies: Vec::new(),
            errors: vec![error],
            grants: Vec::new(),
            shadow: None,
            reason: None,
            approval: None,
            rate_limited: false,
        }
    }

    /// Denied because a policy could not be evaluated (or the request not built), rather than
    /// by what a policy says.
    pub fn is_evaluation_error(&self) -> bool {
        !self.allowed && !self.errors.is_empty()
    }
}

/// Cedar's verdict on one request and toolgate's decision from it (see
/// `PolicyEngine::decide_request`).
#[derive(Debug, Clone, PartialEq)]
pub struct CedarOutcome {
    pub cedar_allows: bool,
    pub reason: Vec<String>,
    /// Ids of the policies that erred (Cedar skips them; toolgate denies).
    pub errors: Vec<String>,
    /// What `authorize` would answer: made by the same code from the same Cedar response.
    pub decision: Decision,
}

/// An immutable, validated policy snapshot.
pub struct PolicyEngine {
    schema: Schema,
    info: SchemaInfo,
    /// The policies that decide.
    enforced: IndexedSet,
    /// The enforced and the `@mode("shadow")` policies together, for the actions some shadow
    /// policy can apply to; `None` without shadow policies.
    shadow: Option<(IndexedSet, HashSet<EntityUid>)>,
    sources: HashMap<PolicyId, PolicySource>,
    /// Per action id, the arguments its policies (enforced and shadow) read.
    arg_reads: HashMap<String, ArgReads>,
    /// Static entities (entities.json + the schema's action entities), transitively closed.
    entities: Entities,
    authorizer: Authorizer,
    /// Entity slices already built, by `slice_key`: a slice depends only on who calls (ids and
    /// the claims the schema declares) and on what, and building one (entities from claims,
    /// Cedar's transitive closure) was most of a decision's cost. Dies with the snapshot.
    slices: RwLock<HashMap<String, Arc<Entities>>>,
}

/// Slices kept per snapshot at most; beyond, the cache starts again empty.
const MAX_SLICES: usize = 4096;

impl PolicyEngine {
    /// Loads and strictly validates a policy directory.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        Self::from_loaded(load_dir(dir)?)
    }

    /// Loads with a cache of what the previous load parsed and validated.
    pub fn load_cached(dir: &Path, cache: &mut crate::LoadCache) -> Result<Self, LoadError> {
        Self::from_loaded(crate::load_dir_cached(dir, cache)?)
    }

    pub fn from_loaded(loaded: Loaded) -> Result<Self, LoadError> {
        let Loaded {
            schema,
            schema_json,
            policies,
            sources,
            entities_json,
            entities_path,
        } = loaded;
        let entities_value = entities_json.unwrap_or_else(|| json!([]));
        let entities =
            Entities::from_json_value(entities_value.clone(), Some(&schema)).map_err(|e| {
                LoadError {
                    problems: vec![crate::Problem {
                        file: entities_path.clone(),
                        line: 1,
                        message: error_chain(&e),
                    }],
                }
            })?;
        let mut entity_json = HashMap::new();
        for entry in entities_value.as_array().into_iter().flatten() {
            if let Some(uid) = entry
                .get("uid")
                .and_then(|u| EntityUid::from_json(u.clone()).ok())
            {
                entity_json.insert(uid, entry.clone());
            }
        }
        let arg_reads = arg_reads_by_action(&schema, &entities, &policies);
        let is_shadow = |p: &Policy| sources.get(p.id()).is_some_and(|s| s.shadow);
        let (enforced, shadow) = if policies.policies().any(is_shadow) {
            let only = |shadow: bool| {
                let mut set = PolicySet::new();
                for policy in policies.policies().filter(|p| is_shadow(p) == shadow) {
                    // Ids are unique in `policies`, so adding cannot clash.
                    let _ = set.add(policy.clone());
                }
                set
            };
            // The actions a shadow policy can apply to: only there can the two sets differ.
            let reached = index_by_action(&schema, &entities, &only(true))
                .into_iter()
                .filter(|(_, p)| p.general.num_of_policies() > 0 || !p.own.is_empty())
                .map(|(action, _)| action)
                .collect();
            let enforced = only(false);
            (
                enforced,
                Some((IndexedSet::new(&schema, &entities, policies), reached)),
            )
        } else {
            (policies, None)
        };
        Ok(PolicyEngine {
            info: SchemaInfo::from_fragment_json(&schema_json),
            enforced: IndexedSet::new(&schema, &entities, enforced),
            shadow,
            schema,
            sources,
            arg_reads,
            entities,
            authorizer: Authorizer::new(),
            slices: RwLock::new(HashMap::new()),
        })
    }

    /// Policies loaded, enforced and shadow.
    pub fn policy_count(&self) -> usize {
        match &self.shadow {
            Some((all, _)) => all.all.num_of_policies(),
            None => self.enforced.all.num_of_policies(),
        }
    }

    /// Every policy's source, by id.
    pub fn sources(&self) -> impl Iterator<Item = (&PolicyId, &PolicySource)> {
        self.sources.iter()
    }

    pub fn source(&self, policy_id: &str) -> Option<&PolicySource> {
        self.sources.get(&PolicyId::new(policy_id))
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn schema_info(&self) -> &SchemaInfo {
        &self.info
    }

    /// The arguments the policies of `action` read (all, for an action not declared).
    pub fn arg_reads(&self, action: &str) -> &ArgReads {
        static ALL: ArgReads = ArgReads::All;
        self.arg_reads.get(action).unwrap_or(&ALL)
    }

    /// Whether the schema declares this action (e.g. `"billing/get_invoice"`).
    pub fn has_action(&self, action: &str) -> bool {
        self.info.actions.contains_key(action)
    }

    /// A loaded policy by id, enforced or `@mode("shadow")`.
    pub fn policy(&self, policy_id: &str) -> Option<&Policy> {
        let all = match &self.shadow {
            Some((all, _)) => &all.all,
            None => &self.enforced.all,
        };
        all.policy(&PolicyId::new(policy_id))
    }

    /// For each of `actions` (tool actions, `"<upstream>/<tool>"`), the enforced permit
    /// policies whose scope admits `agent` calling it on its tool: those that could permit the
    /// call, their `when`/`unless` conditions aside (scope and entity hierarchy only); none
    /// where a forbid without conditions covers the call.
    pub fn permits_in_scope(
        &self,
        agent: &str,
        actions: &[&str],
    ) -> Result<Vec<(String, Vec<String>)>, String> {
        let mut scopes = PolicySet::new();
        for policy in self.enforced.all.policies() {
            let unconditional = !policy.has_non_scope_constraint();
            // A forbid counts only when nothing can narrow it: then it always wins.
            if policy.effect() != cedar_policy::Effect::Permit && !unconditional {
                continue;
            }
            let _ = scopes.add(scope_only(policy, false)?);
        }
        self.admitted(&scopes, agent, actions)
    }

    /// For each of `actions`, those of the policies `policy_ids` (enforced or shadow, permit or
    /// forbid) whose scope admits `agent` calling it on its tool with the current entities,
    /// their conditions aside. An id not loaded admits nothing.
    pub fn scopes_admitting(
        &self,
        policy_ids: &[&str],
        agent: &str,
        actions: &[&str],
    ) -> Result<Vec<(String, Vec<String>)>, String> {
        let mut scopes = PolicySet::new();
        for policy in policy_ids.iter().filter_map(|id| self.policy(id)) {
            let _ = scopes.add(scope_only(policy, true)?);
        }
        self.admitted(&scopes, agent, actions)
    }

    /// For each of `actions`, the policies of `scopes` that determine Cedar's verdict on
    /// `agent` calling it on its tool, with no context (so only scopes can decide): the
    /// permits that admit it, or none when the verdict is deny.
    fn admitted(
        &self,
        scopes: &PolicySet,
        agent: &str,
        actions: &[&str],
    ) -> Result<Vec<(String, Vec<String>)>, String> {
        let principal = uid("Agent", agent)?;
        let mut added: HashMap<EntityUid, Entity> = HashMap::new();
        let mut absent = |id: EntityUid, parents: HashSet<EntityUid>| {
            if self.entities.get(&id).is_none() {
                added
                    .entry(id.clone())
                    .or_insert_with(|| Entity::new_no_attrs(id, parents));
            }
        };
        absent(principal.clone(), HashSet::new());
        let mut asked = Vec::new();
        for action in actions {
            let (upstream, tool) = action
                .split_once('/')
                .ok_or_else(|| format!("`{action}` is not a tool action"))?;
            let upstream_uid = uid("Upstream", upstream)?;
            let resource = resource_uid(&Resource::Tool { upstream, tool })?;
            absent(upstream_uid.clone(), HashSet::new());
            absent(resource.clone(), HashSet::from([upstream_uid]));
            asked.push((*action, uid("Action", action)?, resource));
        }
        let entities = self
            .entities
            .clone()
            .add_entities(added.into_values(), None)
            .map_err(|e| error_chain(&e))?;
        asked
            .into_iter()
            .map(|(name, action, resource)| {
                let request =
                    Request::new(principal.clone(), action, resource, Context::empty(), None)
                        .map_err(|e| error_chain(&e))?;
                let response = self.authorizer.is_authorized(&request, scopes, &entities);
                let mut permits: Vec<String> = match response.decision() {
                    CedarDecision::Allow => response
                        .diagnostics()
                        .reason()
                        .map(ToString::to_string)
                        .collect(),
                    CedarDecision::Deny => Vec::new(),
                };
                permits.sort();
                Ok((name.to_string(), permits))
            })
            .collect()
    }

    /// Decides with only the policies that can apply to the action.
    pub fn authorize(&self, req: &AuthzRequest<'_>) -> Decision {
        self.decide(req, true)
    }

    /// Decides with the whole policy set (for checking the index and for benchmarks).
    pub fn authorize_unindexed(&self, req: &AuthzRequest<'_>) -> Decision {
        self.decide(req, false)
    }

    fn decide(&self, req: &AuthzRequest<'_>, indexed: bool) -> Decision {
        let (action, request, entities) = match self.build(req) {
            Ok(built) => built,
            Err(error) => return Decision::deny_with(error),
        };
        let set_of = |index: &IndexedSet| {
            if indexed {
                index.policies_for(&action, request.principal())
            } else {
                index.all.clone()
            }
        };
        let mut decision = self
            .evaluate(&request, &entities, &set_of(&self.enforced))
            .1;
        if let Some((with_shadow, reached)) = &self.shadow {
            if reached.contains(&action) {
                let (response, shadow) = self.evaluate(&request, &entities, &set_of(with_shadow));
                if shadow.allowed != decision.allowed {
                    decision.shadow = Some(self.shadow_decision(&response, shadow));
                }
            }
        }
        decision
    }

    fn shadow_decision(
        &self,
        response: &cedar_policy::Response,
        decision: Decision,
    ) -> ShadowDecision {
        let is_shadow = |id: &&String| self.source(id).is_some_and(|s| s.shadow);
        let mut erring = erring_policies(response);
        erring.sort();
        let mut flipped_by: Vec<String> = decision
            .policies
            .iter()
            .chain(&erring)
            .filter(is_shadow)
            .cloned()
            .collect();
        flipped_by.sort();
        flipped_by.dedup();
        // Denied for an erring policy, Cedar's reasons are the permits it still found: the
        // determining policies are the erring ones.
        let policies = if !decision.allowed && response.decision() == CedarDecision::Allow {
            erring
        } else {
            decision.policies
        };
        ShadowDecision {
            allowed: decision.allowed,
            policies,
            errors: decision.errors,
            flipped_by,
        }
    }

    /// Asks Cedar, and turns its response into toolgate's decision.
    fn evaluate(
        &self,
        request: &Request,
        entities: &Entities,
        policies: &PolicySet,
    ) -> (cedar_policy::Response, Decision) {
        let response = self.authorizer.is_authorized(request, policies, entities);
        let diagnostics = response.diagnostics();
        // Cedar skips a policy that errs; an erring forbid would let the call through. Deny.
        let mut errors: Vec<String> = diagnostics.errors().map(ToString::to_string).collect();
        errors.sort();
        let mut determining: Vec<String> = diagnostics.reason().map(ToString::to_string).collect();
        determining.sort();
        let allowed = response.decision() == CedarDecision::Allow && errors.is_empty();
        let grants = if allowed {
            let mut grants: Vec<String> = determining
                .iter()
                .filter_map(|id| self.source(id))
                .flat_map(|s| s.grants.iter().cloned())
                .collect();
            grants.sort();
            grants.dedup();
            grants
        } else {
            Vec::new()
        };
        let reason = if allowed {
            None
        } else {
            determining
                .iter()
                .find_map(|id| self.source(id)?.reason.clone())
        };
        let approval = match allowed || !errors.is_empty() || determining.is_empty() {
            true => None,
            false => determining
                .iter()
                .map(|id| self.source(id).and_then(|s| s.approval.clone()))
                .collect::<Option<Vec<_>>>()
                .and_then(|texts| texts.into_iter().next()),
        };
        let rate_limited = !allowed
            && errors.is_empty()
            && determining
                .iter()
                .any(|id| self.source(id).is_some_and(|s| s.rate_limit));
        let decision = Decision {
            allowed,
            policies: determining,
            errors,
            grants,
            shadow: None,
            reason,
            approval,
            rate_limited,
        };
        (response, decision)
    }

    /// Cedar's own verdict on a prepared request, through the index, with policy ids as
    /// toolgate names them, and the decision `authorize` makes from it. For conformance tests
    /// against Cedar's corpus, whose requests are built by the corpus, not from a call.
    pub fn decide_request(&self, request: &Request, entities: &Entities) -> CedarOutcome {
        let policies = match request.action() {
            Some(action) => self.enforced.policies_for(action, request.principal()),
            None => self.enforced.all.clone(),
        };
        let (response, decision) = self.evaluate(request, entities, &policies);
        let mut reason: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        let mut errors = erring_policies(&response);
        reason.sort();
        errors.sort();
        CedarOutcome {
            cedar_allows: response.decision() == CedarDecision::Allow,
            reason,
            errors,
            decision,
        }
    }

    /// Builds the Cedar request and its small entity slice. Any error here denies.
    fn build(&self, req: &AuthzRequest<'_>) -> Result<(EntityUid, Request, Arc<Entities>), String> {
        let action = uid("Action", req.action)?;
        let ctx_type = self
            .info
            .actions
            .get(req.action)
            .ok_or_else(|| format!("action `{}` is not declared in the schema", req.action))?;
        let principal = uid("Agent", req.agent.id)?;
        let user = match &req.user {
            Some(user) => Some(uid("User", user.id)?),
            None => None,
        };
        let resource = resource_uid(&req.resource)?;
        let entities = self.slice(req, &action)?;

        let raw = raw_context(req, user.as_ref());
        let at = At::Root("context");
        let mut typed = coerce_record(&raw, &ctx_type.keys, at)?;
        // The arguments are typed where they are, not copied into `raw` first.
        if let Some((ty, _)) = ctx_type.keys.get("args") {
            let at = At::Field(&at, "args");
            let args = match ty {
                AttrType::Record(declared) => {
                    RestrictedExpression::new_record(coerce_record(&req.args, declared, at)?)
                        .map_err(|e| format!("{at}: {e}"))?
                }
                other => coerce(&Value::Object(req.args.clone()), other, at)?,
            };
            typed.push(("args".into(), args));
        }
        // Typed by us; `Request::new` below checks it against the schema as Cedar reads it
        // (toolgate's reading of types can differ: common types of other namespaces, enums).
        let context =
            Context::from_pairs(typed).map_err(|e| format!("context: {}", error_chain(&e)))?;
        let request = Request::new(
            principal,
            action.clone(),
            resource,
            context,
            Some(&self.schema),
        )
        .map_err(|e| format!("request: {}", error_chain(&e)))?;
        Ok((action, request, entities))
    }

    /// The entity slice of a request: from the cache, or built (and kept, unless its resource
    /// is a task, whose ids never repeat).
    fn slice(&self, req: &AuthzRequest<'_>, action: &EntityUid) -> Result<Arc<Entities>, String> {
        let key = self.slice_key(req);
        if let Some(slice) = self
            .slices
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return Ok(slice.clone());
        }
        let mut slice: HashMap<EntityUid, Entity> = HashMap::new();
        self.principal_entity("Agent", &req.agent, &mut slice)?;
        if let Some(user) = &req.user {
            self.principal_entity("User", user, &mut slice)?;
        }
        self.resource_entity(&req.resource, &mut slice)?;
        self.add_with_ancestors(action, &mut slice);
        let entities = Arc::new(
            Entities::from_entities(slice.into_values(), None)
                .map_err(|e| format!("entities: {}", error_chain(&e)))?,
        );
        if matches!(req.resource, Resource::Tool { .. }) {
            let mut slices = self
                .slices
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if slices.len() >= MAX_SLICES {
                slices.clear();
            }
            slices.insert(key, entities.clone());
        }
        Ok(entities)
    }

    /// Everything a slice is built from, unambiguously: each part length-prefixed; of the
    /// claims, those the schema declares as the entity's attributes (the only ones read).
    fn slice_key(&self, req: &AuthzRequest<'_>) -> String {
        let mut key = String::with_capacity(128);
        let mut part = |text: &str| {
            let _ = write!(key, "{}:{text}", text.len());
        };
        part(req.action);
        match &req.resource {
            Resource::Tool { upstream, tool } => {
                part(upstream);
                part(tool);
            }
            Resource::Task { id } => part(id),
        }
        for (kind, who) in [("Agent", Some(&req.agent)), ("User", req.user.as_ref())] {
            let Some(who) = who else {
                part("none");
                continue;
            };
            part("some");
            part(who.id);
            let type_name = format!("{NAMESPACE}::{kind}");
            for name in self
                .info
                .entity_attrs
                .get(&type_name)
                .into_iter()
                .flatten()
                .map(|(n, _)| n)
            {
                part(name);
                part(
                    &who.claims
                        .get(name)
                        .map_or_else(String::new, Value::to_string),
                );
            }
        }
        key
    }

    /// The Agent or User entity: entities.json data, with schema-declared attributes it does
    /// not set filled from claims (the operator's data wins over the token's).
    fn principal_entity(
        &self,
        kind: &str,
        who: &Principal<'_>,
        slice: &mut HashMap<EntityUid, Entity>,
    ) -> Result<EntityUid, String> {
        let id = uid(kind, who.id)?;
        let type_name = format!("{NAMESPACE}::{kind}");
        let known = self.entities.get(&id);
        let mut from_claims = Vec::new();
        if let Some(declared) = self.info.entity_attrs.get(&type_name) {
            for (name, (ty, required)) in declared {
                if known.is_some_and(|e| e.attr(name).is_some()) {
                    continue;
                }
                match who.claims.get(name) {
                    Some(claim) => {
                        from_claims.push((name.clone(), coerce(claim, ty, At::Claim(name))?))
                    }
                    None if *required => {
                        return Err(format!(
                            "{type_name} `{}`: required attribute `{name}` is missing",
                            who.id
                        ))
                    }
                    None => {}
                }
            }
        }
        let entity = match (known, from_claims.is_empty()) {
            (Some(known), true) => known.clone(),
            (None, true) => Entity::new_no_attrs(id.clone(), HashSet::new()),
            (known, false) => {
                let (_, mut attrs, parents) = match known {
                    Some(k) => k.clone().into_inner(),
                    None => (id.clone(), HashMap::new(), HashSet::new()),
                };
                attrs.extend(from_claims);
                Entity::new(id.clone(), attrs, parents)
                    .map_err(|e| format!("{type_name} `{}`: {}", who.id, error_chain(&e)))?
            }
        };
        self.insert_with_parents(entity, slice);
        Ok(id)
    }

    fn resource_entity(
        &self,
        resource: &Resource<'_>,
        slice: &mut HashMap<EntityUid, Entity>,
    ) -> Result<EntityUid, String> {
        match resource {
            Resource::Tool { upstream, .. } => {
                let upstream_uid = uid("Upstream", upstream)?;
                let tool_uid = resource_uid(resource)?;
                let entity = match self.entities.get(&tool_uid) {
                    Some(known) => known.clone(),
                    None => Entity::new_no_attrs(
                        tool_uid.clone(),
                        HashSet::from([upstream_uid.clone()]),
                    ),
                };
                self.insert_with_parents(entity, slice);
                if !slice.contains_key(&upstream_uid) {
                    slice.insert(
                        upstream_uid.clone(),
                        Entity::new_no_attrs(upstream_uid, HashSet::new()),
                    );
                }
                Ok(tool_uid)
            }
            Resource::Task { .. } => {
                let task_uid = resource_uid(resource)?;
                slice.insert(
                    task_uid.clone(),
                    Entity::new_no_attrs(task_uid.clone(), HashSet::new()),
                );
                Ok(task_uid)
            }
        }
    }

    fn insert_with_parents(&self, entity: Entity, slice: &mut HashMap<EntityUid, Entity>) {
        let uid = entity.uid();
        let (_, _, parents) = entity.clone().into_inner();
        slice.insert(uid, entity);
        for parent in parents {
            self.add_with_ancestors(&parent, slice);
        }
    }

    /// Adds a static entity and everything above it (all known already closed transitively).
    fn add_with_ancestors(&self, uid: &EntityUid, slice: &mut HashMap<EntityUid, Entity>) {
        let ancestors: Vec<EntityUid> = self
            .entities
            .ancestors(uid)
            .map(|a| a.cloned().collect())
            .unwrap_or_default();
        for id in std::iter::once(uid.clone()).chain(ancestors) {
            if slice.contains_key(&id) {
                continue;
            }
            let entity = match self.entities.get(&id) {
                Some(e) => e.clone(),
                None => Entity::new_no_attrs(id.clone(), HashSet::new()),
            };
            slice.insert(id, entity);
        }
    }
}

/// The ids of the policies that erred in a response (Cedar skips them; toolgate denies).
/// `policy` with its conditions dropped (its scope alone), under the same id; a permit when
/// `as_permit`, else with its own effect.
fn scope_only(policy: &Policy, as_permit: bool) -> Result<Policy, String> {
    let mut json = policy.to_json().map_err(|e| error_chain(&e))?;
    json["conditions"] = json!([]);
    if as_permit {
        json["effect"] = json!("permit");
    }
    Policy::from_json(Some(policy.id().clone()), json)
        .map_err(|e| format!("policy {}: {}", policy.id(), error_chain(&e)))
}

fn erring_policies(response: &cedar_policy::Response) -> Vec<String> {
    response
        .diagnostics()
        .errors()
        .map(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(e) => e.policy_id().to_string(),
        })
        .collect()
}

/// The resource's uid: `Tool::"<upstream>/<tool>"` or `Task::"<id>"`.
fn resource_uid(resource: &Resource<'_>) -> Result<EntityUid, String> {
    match resource {
        Resource::Tool { upstream, tool } => uid("Tool", &format!("{upstream}/{tool}")),
        Resource::Task { id } => uid("Task", id),
    }
}

/// `Toolgate::<kind>::"<id>"`. Builds from a parsed type name: parsing a whole uid runs
/// Cedar's parser, which costs microseconds on every call.
pub fn uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    let type_name = match kind {
        "Agent" => &TYPES.agent,
        "User" => &TYPES.user,
        "Tool" => &TYPES.tool,
        "Upstream" => &TYPES.upstream,
        "Task" => &TYPES.task,
        "Action" => &TYPES.action,
        other => {
            return EntityTypeName::from_str(&format!("{NAMESPACE}::{other}"))
                .map(|t| EntityUid::from_type_name_and_id(t, EntityId::new(id)))
                .map_err(|e| format!("invalid entity type {other}: {e}"))
        }
    };
    Ok(EntityUid::from_type_name_and_id(
        type_name.clone(),
        EntityId::new(id),
    ))
}

struct Types {
    agent: EntityTypeName,
    user: EntityTypeName,
    tool: EntityTypeName,
    upstream: EntityTypeName,
    task: EntityTypeName,
    action: EntityTypeName,
}

static TYPES: std::sync::LazyLock<Types> = std::sync::LazyLock::new(|| {
    let parse = |kind: &str| {
        EntityTypeName::from_str(&format!("{NAMESPACE}::{kind}")).expect("valid type name")
    };
    Types {
        agent: parse("Agent"),
        user: parse("User"),
        tool: parse("Tool"),
        upstream: parse("Upstream"),
        task: parse("Task"),
        action: parse("Action"),
    }
});

/// The whole context before typing; the action's declared context decides what is kept.
fn raw_context(req: &AuthzRequest<'_>, user: Option<&EntityUid>) -> Map<String, Value> {
    let source_ip = match req.env.source_ip {
        // Cedar's ip() rejects IPv4-mapped IPv6, which dual-stack listeners report.
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let mut ctx = Map::new();
    if let Some(user) = user {
        ctx.insert(
            "user".into(),
            Value::String(user.id().unescaped().to_string()),
        );
    }
    ctx.insert(
        "env".into(),
        json!({
            "source_ip": source_ip.to_string(),
            "hour": req.env.time.hour(),
            "time": utc_millis(req.env.time),
        }),
    );
    if let Some(task) = &req.task {
        let mut value = json!({
            "id": task.id, "intent": task.intent, "approved": task.approved, "owner": task.owner,
        });
        if let Some(by) = &task.approved_by {
            value["approved_by"] = json!(by);
        }
        if let Some(user) = &task.owner_user {
            value["owner_user"] = json!(user);
        }
        ctx.insert("task".into(), value);
    }
    if let Some(approval) = &req.approval {
        let at = chrono::DateTime::from_timestamp(approval.at as i64, 0).unwrap_or_default();
        let mut value = json!({"id": approval.id, "by": approval.by, "at": utc_millis(at)});
        if let Some(note) = &approval.note {
            value["note"] = json!(note);
        }
        ctx.insert("approval".into(), value);
    }
    if let Some(usage) = &req.usage {
        ctx.insert("usage".into(), Value::Object(usage.clone()));
    }
    // Kept only where the action's context declares it, like every key here.
    ctx.insert("issuer".into(), Value::String(req.issuer.to_string()));
    ctx
}

/// Keeps the declared attributes of `raw`, each coerced to its declared type. Undeclared
/// attributes are dropped (no policy can name them); a missing required one is left for
/// Cedar to report, which denies.
pub fn coerce_record(
    raw: &Map<String, Value>,
    declared: &Record,
    at: At<'_>,
) -> Result<Vec<(String, RestrictedExpression)>, String> {
    let mut out = Vec::with_capacity(declared.len());
    for (name, (ty, _required)) in declared {
        if let Some(value) = raw.get(name) {
            out.push((name.clone(), coerce(value, ty, At::Field(&at, name))?));
        }
    }
    Ok(out)
}

/// Where a value sits, for error messages: made into text only when one is needed.
#[derive(Debug, Clone, Copy)]
pub enum At<'a> {
    Root(&'a str),
    Claim(&'a str),
    Field(&'a At<'a>, &'a str),
    Index(&'a At<'a>, usize),
}

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Root(name) => f.write_str(name),
            At::Claim(name) => write!(f, "claim `{name}`"),
            At::Field(parent, name) => write!(f, "{parent}.{name}"),
            At::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// What a value is, for an error message, without echoing it: it is the agent's, and may be a
/// secret (`@sensitive`).
pub fn described(value: &Value) -> String {
    match value {
        Value::String(s) => format!("a string of {} bytes", s.len()),
        Value::Number(_) => "a number".to_string(),
        Value::Bool(_) => "a boolean".to_string(),
        Value::Array(items) => format!("a list of {}", items.len()),
        Value::Object(_) => "an object".to_string(),
        Value::Null => "null".to_string(),
    }
}

/// Turns a JSON value (often a string from a path or query) into a Cedar value of the
/// declared type, or says why it cannot.
pub fn coerce(value: &Value, ty: &AttrType, at: At<'_>) -> Result<RestrictedExpression, String> {
    let mismatch = |want: &str| format!("{at}: expected {want}, got {}", described(value));
    Ok(match (ty, value) {
        (AttrType::Long, Value::Number(n)) => {
            RestrictedExpression::new_long(n.as_i64().ok_or_else(|| mismatch("Long"))?)
        }
        (AttrType::Long, Value::String(s)) => {
            RestrictedExpression::new_long(s.trim().parse::<i64>().map_err(|_| mismatch("Long"))?)
        }
        (AttrType::Bool, Value::Bool(b)) => RestrictedExpression::new_bool(*b),
        (AttrType::Bool, Value::String(s)) if s == "true" || s == "false" => {
            RestrictedExpression::new_bool(s == "true")
        }
        (AttrType::String, Value::String(s)) => RestrictedExpression::new_string(s.clone()),
        (AttrType::Set(element), Value::Array(items)) => RestrictedExpression::new_set(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| coerce(item, element, At::Index(&at, i)))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        // One query value where a set is declared: a set of one.
        (AttrType::Set(element), single) => {
            RestrictedExpression::new_set([coerce(single, element, at)?])
        }
        (AttrType::Record(declared), Value::Object(raw)) => {
            RestrictedExpression::new_record(coerce_record(raw, declared, at)?)
                .map_err(|e| format!("{at}: {e}"))?
        }
        (AttrType::Entity(type_name), Value::String(id)) => RestrictedExpression::new_entity_uid(
            EntityUid::from_type_name_and_id(type_name.clone(), EntityId::new(id)),
        ),
        (AttrType::Extension(name), Value::Number(n)) if name == "decimal" => {
            let text = n.to_string();
            RestrictedExpression::new_decimal(if text.contains('.') {
                text
            } else {
                format!("{text}.0")
            })
        }
        (AttrType::Extension(name), Value::String(s)) => match name.as_str() {
            "ipaddr" => extension_value(0, s, |t| RestrictedExpression::new_ip(t)),
            "decimal" => extension_value(1, s, |t| RestrictedExpression::new_decimal(t)),
            "datetime" => extension_value(2, s, |t| RestrictedExpression::new_datetime(t)),
            "duration" => extension_value(3, s, |t| RestrictedExpression::new_duration(t)),
            other => return Err(format!("{at}: unsupported extension type {other}")),
        },
        (AttrType::Long, _) => return Err(mismatch("Long")),
        (AttrType::Bool, _) => return Err(mismatch("Bool")),
        (AttrType::String, _) => return Err(mismatch("String")),
        (AttrType::Record(_), _) => return Err(mismatch("Record")),
        (AttrType::Entity(type_name), _) => return Err(mismatch(&format!("{type_name} id"))),
        (AttrType::Extension(name), _) => return Err(mismatch(name)),
        (AttrType::Unreadable(name), _) => {
            return Err(format!("{at}: type {name} cannot be read by toolgate"))
        }
    })
}

/// `2026-11-23T10:00:00.123Z`, the form Cedar's `datetime` and the audit log take. Formatted
/// once per millisecond and thread: calls in the same millisecond share the text.
pub fn utc_millis(time: DateTime<Utc>) -> String {
    thread_local! {
        static LAST: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    let millis = time.timestamp_millis();
    LAST.with_borrow_mut(|(at, text)| {
        if *at != millis {
            *at = millis;
            *text = time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        }
        text.clone()
    })
}

/// Extension values already built, per extension (ipaddr, decimal, datetime, duration) and
/// text. Cedar's constructors parse the extension's name with its grammar on every call
/// (microseconds); a gateway sees few source addresses, and under load many calls share a
/// millisecond. Each map starts again empty when full.
static EXTENSION_VALUES: LazyLock<[Mutex<HashMap<String, RestrictedExpression>>; 4]> =
    LazyLock::new(Default::default);
const MAX_EXTENSION_VALUES: usize = 1024;
const MAX_EXTENSION_TEXT: usize = 64;

fn extension_value(
    kind: usize,
    text: &str,
    build: fn(&str) -> RestrictedExpression,
) -> RestrictedExpression {
    // Only short texts are kept (addresses, times): an argument's text is the agent's.
    if text.len() > MAX_EXTENSION_TEXT {
        return build(text);
    }
    let mut values = EXTENSION_VALUES[kind]
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(value) = values.get(text) {
        return value.clone();
    }
    if values.len() >= MAX_EXTENSION_VALUES {
        values.clear();
    }
    let value = build(text);
    values.insert(text.to_string(), value.clone());
    value
}

/// The policies that can apply to one action: those open to any principal, and for each
/// principal a `principal == ...` scope names, those plus its own. A decision evaluates one of
/// these sets, so its cost follows the policies that can apply, not the size of the set.
/// A principal's set is built when it first calls (a set costs kilobytes, and 10,000 agents
/// with a policy each would otherwise hold tens of megabytes for agents that never call).
#[derive(Default)]
struct ActionPolicies {
    general: Arc<PolicySet>,
    /// Each named principal's own policies (ids in the whole set).
    own: HashMap<EntityUid, Vec<PolicyId>>,
    /// Sets built so far (`MAX_PRINCIPAL_SETS` in all actions at most).
    built: RwLock<HashMap<EntityUid, Arc<PolicySet>>>,
}

/// Per-principal sets kept per snapshot, over all actions; beyond, they start again.
const MAX_PRINCIPAL_SETS: usize = 4096;

/// A policy set and its index by action.
struct IndexedSet {
    all: Arc<PolicySet>,
    by_action: HashMap<EntityUid, ActionPolicies>,
    /// Per-principal sets built (`ActionPolicies::built`), over all actions.
    principal_sets: AtomicUsize,
}

impl IndexedSet {
    fn new(schema: &Schema, entities: &Entities, policies: PolicySet) -> IndexedSet {
        IndexedSet {
            by_action: index_by_action(schema, entities, &policies),
            all: Arc::new(policies),
            principal_sets: AtomicUsize::new(0),
        }
    }

    /// The policies that can apply to a request for `action`: its slice of the index, or the
    /// whole set for an action the schema does not declare (only unvalidated requests have one).
    fn policies_for(&self, action: &EntityUid, principal: Option<&EntityUid>) -> Arc<PolicySet> {
        let (Some(policies), Some(principal)) = (self.by_action.get(action), principal) else {
            return self.all.clone();
        };
        let Some(own) = policies.own.get(principal) else {
            return policies.general.clone();
        };
        if let Some(set) = policies
            .built
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(principal)
        {
            return set.clone();
        }
        let mut set = (*policies.general).clone();
        for policy in own.iter().filter_map(|id| self.all.policy(id)) {
            // Ids are unique in the whole set, so adding cannot clash.
            let _ = set.add(policy.clone());
        }
        let set = Arc::new(set);
        if self.principal_sets.fetch_add(1, Ordering::Relaxed) >= MAX_PRINCIPAL_SETS {
            for other in self.by_action.values() {
                other
                    .built
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
            }
            self.principal_sets.store(1, Ordering::Relaxed);
        }
        policies
            .built
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(principal.clone(), set.clone());
        set
    }
}

/// The schema's actions, each with its ancestors (the groups it is `in`).
fn actions_with_ancestors(
    schema: &Schema,
    entities: &Entities,
) -> Vec<(EntityUid, HashSet<EntityUid>)> {
    schema
        .actions()
        .map(|a| {
            let up = entities
                .ancestors(a)
                .map(|it| it.cloned().collect())
                .unwrap_or_default();
            (a.clone(), up)
        })
        .collect()
}

/// The actions whose requests `policy`'s action scope can match.
fn policy_targets<'a>(
    policy: &Policy,
    actions: &'a [(EntityUid, HashSet<EntityUid>)],
) -> Vec<&'a EntityUid> {
    match policy.action_constraint() {
        ActionConstraint::Any => actions.iter().map(|(a, _)| a).collect(),
        ActionConstraint::Eq(a) => actions
            .iter()
            .map(|(action, _)| action)
            .filter(|action| **action == a)
            .take(1)
            .collect(),
        ActionConstraint::In(groups) => actions
            .iter()
            .filter(|(action, up)| groups.iter().any(|g| g == action || up.contains(g)))
            .map(|(action, _)| action)
            .collect(),
    }
}

/// Per action id, the arguments read by the policies that can apply to it.
fn arg_reads_by_action(
    schema: &Schema,
    entities: &Entities,
    policies: &PolicySet,
) -> HashMap<String, ArgReads> {
    let actions = actions_with_ancestors(schema, entities);
    let mut out: HashMap<String, ArgReads> = actions
        .iter()
        .map(|(a, _)| (a.id().unescaped().to_string(), ArgReads::none()))
        .collect();
    for policy in policies.policies() {
        // A policy whose form cannot be read is taken to read everything.
        let reads = policy
            .to_json()
            .map(|json| ArgReads::of_policy(&json))
            .unwrap_or(ArgReads::All);
        for action in policy_targets(policy, &actions) {
            if let Some(entry) = out.get_mut(action.id().unescaped()) {
                entry.add(&reads);
            }
        }
    }
    out
}

/// For each action in the schema, the policies whose action scope can match it, split by
/// `principal ==` scope.
fn index_by_action(
    schema: &Schema,
    entities: &Entities,
    policies: &PolicySet,
) -> HashMap<EntityUid, ActionPolicies> {
    let actions = actions_with_ancestors(schema, entities);
    // Per action: the policies open to any principal, and those naming one.
    let mut general: HashMap<&EntityUid, Vec<&Policy>> = HashMap::new();
    let mut named: HashMap<&EntityUid, HashMap<EntityUid, Vec<&Policy>>> = HashMap::new();
    for policy in policies.policies() {
        let targets = policy_targets(policy, &actions);
        let principal = match policy.principal_constraint() {
            PrincipalConstraint::Eq(p) => Some(p),
            _ => None,
        };
        for action in targets {
            match &principal {
                Some(p) => named
                    .entry(action)
                    .or_default()
                    .entry(p.clone())
                    .or_default()
                    .push(policy),
                None => general.entry(action).or_default().push(policy),
            }
        }
    }
    let set_of = |policies: &[&Policy]| {
        let mut set = PolicySet::new();
        for policy in policies {
            // Ids are unique in `policies`, so adding cannot clash.
            let _ = set.add((*policy).clone());
        }
        set
    };
    actions
        .iter()
        .map(|(action, _)| {
            let open = general.get(action).map(Vec::as_slice).unwrap_or_default();
            let own = named
                .remove(action)
                .unwrap_or_default()
                .into_iter()
                .map(|(principal, own)| (principal, own.iter().map(|p| p.id().clone()).collect()))
                .collect();
            (
                action.clone(),
                ActionPolicies {
                    general: Arc::new(set_of(open)),
                    own,
                    built: RwLock::default(),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn example() -> PolicyEngine {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        PolicyEngine::load(&dir).unwrap_or_else(|e| panic!("example policies load: {e}"))
    }

    fn env() -> Env {
        Env {
            source_ip: "::ffff:127.0.0.1".parse().unwrap(),
            time: "2026-11-23T10:15:00Z".parse().unwrap(),
        }
    }

    fn call<'a>(
        agent: &'a Map<String, Value>,
        user: Option<&'a Map<String, Value>>,
        action: &'a str,
        args: Value,
    ) -> AuthzRequest<'a> {
        let (upstream, tool) = action.split_once('/').unwrap();
        AuthzRequest {
            agent: Principal {
                id: "assistant",
                claims: agent,
            },
            user: user.map(|claims| Principal {
                id: "alice",
                claims,
            }),
            action,
            resource: Resource::Tool { upstream, tool },
            args: args.as_object().cloned().unwrap_or_default(),
            env: env(),
            task: None,
            issuer: "",
            approval: None,
            usage: None,
        }
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn path_parameter_declared_long_arrives_as_long() {
        let engine = example();
        let (agent, user) = (claims(json!({})), claims(json!({})));
        let d = engine.authorize(&call(
            &agent,
            Some(&user),
            "billing/get_invoice",
            json!({"invoice_id": "42"}),
        ));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policies, vec!["billing-read"]);
        assert_eq!(d.grants, vec!["invoices:read"]);

        let d = engine.authorize(&call(
            &agent,
            Some(&user),
            "billing/get_invoice",
            json!({"invoice_id": "4x"}),
        ));
        assert!(!d.allowed);
        assert!(d.errors[0].contains("expected Long"), "{d:?}");
    }

    #[test]
    fn permit_needs_a_delegating_user() {
        let engine = example();
        let agent = claims(json!({}));
        let d = engine.authorize(&call(
            &agent,
            None,
            "billing/get_invoice",
            json!({"invoice_id": 7}),
        ));
        assert!(!d.allowed);
        assert!(
            d.policies.is_empty() && d.errors.is_empty(),
            "plain default deny: {d:?}"
        );
    }

    #[test]
    fn forbid_overrides_permit() {
        let engine = example();
        let (agent, user) = (claims(json!({})), claims(json!({})));
        let small = engine.authorize(&call(
            &agent,
            Some(&user),
            "billing/refund",
            json!({"invoice_id": 1, "amount": 20}),
        ));
        assert!(small.allowed, "{small:?}");
        let large = engine.authorize(&call(
            &agent,
            Some(&user),
            "billing/refund",
            json!({"invoice_id": 1, "amount": 900}),
        ));
        assert!(!large.allowed);
        assert_eq!(large.policies, vec!["refund-limit"]);
    }

    #[test]
    fn user_attribute_comes_from_claims() {
        let engine = example();
        let agent = claims(json!({}));
        let user = claims(json!({"patient_id": "p-100", "unrelated": [1, 2]}));
        let own = engine.authorize(&call(
            &agent,
            Some(&user),
            "records/get_patient_record",
            json!({"patient_id": "p-100"}),
        ));
        assert!(own.allowed, "{own:?}");
        let other = engine.authorize(&call(
            &agent,
            Some(&user),
            "records/get_patient_record",
            json!({"patient_id": "p-200"}),
        ));
        assert!(!other.allowed);
        let mistyped = claims(json!({"patient_id": 100}));
        let d = engine.authorize(&call(
            &agent,
            Some(&mistyped),
            "records/get_patient_record",
            json!({"patient_id": "100"}),
        ));
        assert!(!d.allowed && !d.errors.is_empty(), "{d:?}");
    }

    #[test]
    fn unknown_action_and_unknown_agent_deny() {
        let engine = example();
        let (agent, user) = (claims(json!({})), claims(json!({})));
        let d = engine.authorize(&call(&agent, Some(&user), "billing/nope", json!({})));
        assert!(!d.allowed && d.errors[0].contains("not declared"), "{d:?}");

        let mut req = call(
            &agent,
            Some(&user),
            "billing/get_invoice",
            json!({"invoice_id": 1}),
        );
        req.agent.id = "stranger";
        assert!(!engine.authorize(&req).allowed);
    }

    #[test]
    fn undeclared_args_are_dropped_and_missing_required_ones_deny() {
        let engine = example();
        let (agent, user) = (claims(json!({})), claims(json!({})));
        let d = engine.authorize(&call(
            &agent,
            Some(&user),
            "billing/get_invoice",
            json!({"invoice_id": 3, "debug": "x"}),
        ));
        assert!(d.allowed, "{d:?}");
        let d = engine.authorize(&call(&agent, Some(&user), "billing/get_invoice", json!({})));
        assert!(!d.allowed && !d.errors.is_empty(), "{d:?}");
    }

    #[test]
    fn indexed_and_whole_set_agree_on_examples() {
        let engine = example();
        let (agent, user) = (claims(json!({})), claims(json!({"patient_id": "p-1"})));
        for (action, args) in [
            ("billing/get_invoice", json!({"invoice_id": 1})),
            ("billing/list_invoices", json!({"limit": "5"})),
            ("billing/refund", json!({"invoice_id": 1, "amount": 501})),
            ("records/get_patient_record", json!({"patient_id": "p-1"})),
            (
                "records/delete_patient_record",
                json!({"patient_id": "p-1"}),
            ),
        ] {
            for u in [None, Some(&user)] {
                let req = call(&agent, u, action, args.clone());
                assert_eq!(
                    engine.authorize(&req),
                    engine.authorize_unindexed(&req),
                    "{action}"
                );
            }
        }
    }

    #[test]
    fn policy_sources_have_file_and_line() {
        let engine = example();
        let src = engine.source("refund-limit").unwrap();
        assert!(src.file.ends_with("billing.cedar"));
        let text = std::fs::read_to_string(&src.file).unwrap();
        assert!(text
            .lines()
            .nth(src.line - 1)
            .unwrap()
            .contains("@id(\"refund-limit\")"));
    }
}

#[cfg(test)]
mod load_tests {
    use super::*;

    /// A copy of the example policies plus `extra` files, in a fresh directory.
    fn dir_with(extra: &[(&str, &str)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        for entry in std::fs::read_dir(examples).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, dir.0.join(path.file_name().unwrap())).unwrap();
            }
        }
        for (name, text) in extra {
            std::fs::write(dir.0.join(name), text).unwrap();
        }
        dir
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let path = std::env::temp_dir().join(format!("toolgate-policy-{}", uuid()));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        fn uuid() -> String {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            format!(
                "{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            )
        }
    }

    #[test]
    fn a_panicking_check_worker_fails_the_load() {
        let dir = dir_with(&[(
            "panics-here.cedar",
            "permit(principal, action == Toolgate::Action::\"list\", resource);\n",
        )]);
        *crate::load::PANIC_ON_FILE.lock().unwrap() = Some("panics-here.cedar");
        let result = PolicyEngine::load(&dir.0);
        *crate::load::PANIC_ON_FILE.lock().unwrap() = None;
        let err = result
            .err()
            .expect("a load whose worker panicked must fail");
        assert!(err.to_string().contains("worker failed"), "{err}");
        // Without the fault the same directory loads: the failure came from the panic.
        assert!(PolicyEngine::load(&dir.0).is_ok());
    }

    /// alice's assistant calling `action` with `args` (a finance agent, as entities.json says).
    fn decide_for(engine: &PolicyEngine, action: &str, args: Value) -> Decision {
        let none = Map::new();
        let (upstream, tool) = action.split_once('/').unwrap();
        engine.authorize(&AuthzRequest {
            agent: Principal {
                id: "assistant",
                claims: &none,
            },
            user: Some(Principal {
                id: "alice",
                claims: &none,
            }),
            action,
            resource: Resource::Tool { upstream, tool },
            args: args.as_object().cloned().unwrap_or_default(),
            env: Env {
                source_ip: "127.0.0.1".parse().unwrap(),
                time: "2026-11-23T10:15:00Z".parse().unwrap(),
            },
            task: None,
            issuer: "",
            approval: None,
            usage: None,
        })
    }

    #[test]
    fn shadow_policies_never_decide_and_say_what_they_would_flip() {
        let shadow = "@id(\"no-small-refunds\")\n@mode(\"shadow\")\nforbid (principal, action == Toolgate::Action::\"billing/refund\", resource) when { context.args.amount < 100 };\n\
            @id(\"records-delete\")\n@mode(\"shadow\")\npermit (principal, action == Toolgate::Action::\"records/delete_patient_record\", resource);\n\
            @id(\"enforced-by-name\")\n@mode(\"enforce\")\npermit (principal, action == Toolgate::Action::\"billing/list_invoices\", resource);\n";
        let dir = dir_with(&[("shadow.cedar", shadow)]);
        let engine = PolicyEngine::load(&dir.0).unwrap();
        let plain = PolicyEngine::load(&dir_with(&[]).0).unwrap();
        assert_eq!(engine.policy_count(), plain.policy_count() + 3);

        // Allowed, and the shadow forbid would deny: the call stays allowed.
        let refund = json!({"invoice_id": 1, "amount": 50});
        let decision = decide_for(&engine, "billing/refund", refund.clone());
        assert!(decision.allowed);
        assert_eq!(decision.policies, ["billing-refund"]);
        assert_eq!(decision.grants, ["refunds:write"]);
        let flip = decision.shadow.expect("a flip");
        assert!(!flip.allowed);
        assert_eq!(flip.policies, ["no-small-refunds"]);
        assert_eq!(flip.flipped_by, ["no-small-refunds"]);
        // Without the shadow policy, the very same decision.
        let without = decide_for(&plain, "billing/refund", refund);
        assert_eq!(
            Decision {
                shadow: None,
                ..decision
            },
            without
        );

        // Where the shadow set agrees, nothing is said.
        let large = decide_for(
            &engine,
            "billing/refund",
            json!({"invoice_id": 1, "amount": 200}),
        );
        assert!(large.allowed && large.shadow.is_none());

        // Denied (no permit), and the shadow permit would allow: still denied.
        let delete = decide_for(
            &engine,
            "records/delete_patient_record",
            json!({"patient_id": "p-1"}),
        );
        assert!(!delete.allowed);
        assert!(delete.policies.is_empty());
        let flip = delete.shadow.expect("a flip");
        assert!(flip.allowed);
        assert_eq!(flip.flipped_by, ["records-delete"]);

        // `@mode("enforce")` is an ordinary policy; an action no shadow policy reaches is
        // decided once.
        let list = decide_for(&engine, "billing/list_invoices", json!({}));
        assert!(list.allowed && list.shadow.is_none());
        assert!(list.policies.contains(&"enforced-by-name".to_string()));
        // Unindexed, the same.
        let refund = json!({"invoice_id": 1, "amount": 50});
        let indexed = decide_for(&engine, "billing/refund", refund.clone());
        let none = Map::new();
        let request = AuthzRequest {
            agent: Principal {
                id: "assistant",
                claims: &none,
            },
            user: Some(Principal {
                id: "alice",
                claims: &none,
            }),
            action: "billing/refund",
            resource: Resource::Tool {
                upstream: "billing",
                tool: "refund",
            },
            args: refund.as_object().cloned().unwrap(),
            env: Env {
                source_ip: "127.0.0.1".parse().unwrap(),
                time: "2026-11-23T10:15:00Z".parse().unwrap(),
            },
            task: None,
            issuer: "",
            approval: None,
            usage: None,
        };
        assert_eq!(engine.authorize_unindexed(&request), indexed);
    }

    #[test]
    fn permits_in_scope_follow_principal_action_and_resource_scopes() {
        let engine = PolicyEngine::load(&dir_with(&[]).0).unwrap();
        let actions = [
            "billing/get_invoice",
            "billing/refund",
            "records/get_patient_record",
            "records/delete_patient_record",
        ];
        let assistant: HashMap<String, Vec<String>> = engine
            .permits_in_scope("assistant", &actions)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(assistant["billing/get_invoice"], ["billing-read"]);
        assert_eq!(assistant["billing/refund"], ["billing-refund"]);
        assert_eq!(assistant["records/get_patient_record"], ["own-record-only"]);
        assert!(assistant["records/delete_patient_record"].is_empty());
        // In no team: no team's permit admits it.
        let intern = engine.permits_in_scope("intern-bot", &actions).unwrap();
        assert!(
            intern.iter().all(|(_, permits)| permits.is_empty()),
            "{intern:?}"
        );
        // A forbid without conditions leaves nothing to permit.
        let forbidding = dir_with(&[(
            "no-refunds.cedar",
            "forbid (principal == Toolgate::Agent::\"assistant\", action == Toolgate::Action::\"billing/refund\", resource);",
        )]);
        let engine_forbidding = PolicyEngine::load(&forbidding.0).unwrap();
        let forbidden: HashMap<String, Vec<String>> = engine_forbidding
            .permits_in_scope("assistant", &actions)
            .unwrap()
            .into_iter()
            .collect();
        assert!(forbidden["billing/refund"].is_empty());
        assert_eq!(forbidden["billing/get_invoice"], ["billing-read"]);
        // An agent the entities do not know is in no team either.
        let stranger = engine.permits_in_scope("nobody", &actions).unwrap();
        assert!(stranger.iter().all(|(_, permits)| permits.is_empty()));
    }

    #[test]
    fn scopes_admitting_names_the_given_policies_whatever_their_effect_or_mode() {
        let dir = dir_with(&[(
            "more.cedar",
            "@id(\"shadow-permit\")\n@mode(\"shadow\")\npermit (principal in Toolgate::Team::\"finance-agents\", action, resource) when { false };\n\
             @id(\"no-refunds\")\nforbid (principal, action == Toolgate::Action::\"billing/refund\", resource) when { context has user };\n",
        )]);
        let engine = PolicyEngine::load(&dir.0).unwrap();
        assert!(engine.policy("shadow-permit").is_some());
        assert!(engine.policy("billing-read").is_some());
        assert!(engine.policy("gone").is_none());
        let actions = ["billing/get_invoice", "billing/refund"];
        let ids = ["billing-read", "shadow-permit", "no-refunds", "gone"];
        let admitted: HashMap<String, Vec<String>> = engine
            .scopes_admitting(&ids, "assistant", &actions)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(
            admitted["billing/get_invoice"],
            ["billing-read", "shadow-permit"]
        );
        assert_eq!(admitted["billing/refund"], ["no-refunds", "shadow-permit"]);
        // Not in the team: only the forbid's scope (any principal) admits it.
        let intern: HashMap<String, Vec<String>> = engine
            .scopes_admitting(&ids, "intern-bot", &actions)
            .unwrap()
            .into_iter()
            .collect();
        assert!(intern["billing/get_invoice"].is_empty());
        assert_eq!(intern["billing/refund"], ["no-refunds"]);
    }

    #[test]
    fn an_erring_shadow_policy_is_a_would_be_deny() {
        let shadow = "@id(\"erring\")\n@mode(\"shadow\")\nforbid (principal, action == Toolgate::Action::\"billing/refund\", resource) when { context.args.amount + 9223372036854775807 < 0 };\n";
        let engine = PolicyEngine::load(&dir_with(&[("shadow.cedar", shadow)]).0).unwrap();
        // The sum overflows a Long: the policy errs, which would deny.
        let decision = decide_for(
            &engine,
            "billing/refund",
            json!({"invoice_id": 1, "amount": 5}),
        );
        assert!(decision.allowed, "{decision:?}");
        let flip = decision.shadow.expect("a flip");
        assert!(!flip.allowed && !flip.errors.is_empty());
        assert_eq!(flip.flipped_by, ["erring"]);
        assert_eq!(
            flip.policies,
            ["erring"],
            "not the permits Cedar still found"
        );
    }

    #[test]
    fn an_unknown_mode_fails_the_load() {
        let dir = dir_with(&[(
            "modes.cedar",
            "permit(principal, action == Toolgate::Action::\"list\", resource);\n\n@mode(\"shaddow\")\npermit(principal, action == Toolgate::Action::\"list\", resource);\n",
        )]);
        let err = PolicyEngine::load(&dir.0).err().expect("refused");
        let text = err.to_string();
        assert!(text.contains("modes.cedar:3:"), "{text}");
        assert!(text.contains("shaddow"), "{text}");
    }

    #[test]
    fn invalid_policy_is_reported_with_file_and_line() {
        let dir = dir_with(&[(
            "bad.cedar",
            "permit(principal, action, resource);\n\npermit(principal, action == Toolgate::Action::\"billing/refund\", resource)\nwhen { context.args.amout > 1 };\n",
        )]);
        let err = PolicyEngine::load(&dir.0).err().expect("must be rejected");
        let text = err.to_string();
        assert!(
            err.problems.iter().all(|p| p.file.ends_with("bad.cedar")),
            "{text}"
        );
        assert!(text.contains("bad.cedar:4:"), "{text}");
        assert!(text.contains("bad.1"), "{text}");
    }

    #[test]
    fn syntax_error_and_duplicate_ids_are_reported() {
        let dir = dir_with(&[
            ("syntax.cedar", "permit(principal, action, resource);\nforbid(principal,, resource);\n"),
            ("dup.cedar", "@id(\"refund-limit\")\npermit(principal, action == Toolgate::Action::\"list\", resource);\n"),
        ]);
        let err = PolicyEngine::load(&dir.0).err().expect("must be rejected");
        let text = err.to_string();
        assert!(text.contains("syntax.cedar:2:"), "{text}");
        assert!(
            text.contains("duplicate policy id `refund-limit`"),
            "{text}"
        );
    }

    #[test]
    fn issuer_and_task_owner_reach_only_contexts_that_declare_them() {
        let dir = dir_with(&[
            (
                "partner.cedarschema",
                "namespace Toolgate { type Owned = { id: String, intent: String, owner: String, owner_user?: String };\n action \"partner/read\" in [call] appliesTo { principal: Agent, resource: Tool, context: { env: Env, issuer: String, task?: Owned } }; }",
            ),
            (
                "partner.cedar",
                "permit (principal, action == Toolgate::Action::\"partner/read\", resource) when { context.issuer == \"https://partner\" && context has task && context.task.owner == \"assistant\" };",
            ),
        ]);
        let engine = PolicyEngine::load(&dir.0).unwrap();
        let claims = json!({"name": "assistant"}).as_object().unwrap().clone();
        let request = |issuer: &'static str, owner: &str| AuthzRequest {
            agent: Principal {
                id: "assistant",
                claims: &claims,
            },
            user: None,
            action: "partner/read",
            resource: Resource::Tool {
                upstream: "partner",
                tool: "read",
            },
            args: Map::new(),
            env: Env {
                source_ip: "127.0.0.1".parse().unwrap(),
                time: Utc::now(),
            },
            task: Some(TaskContext {
                id: "t".into(),
                intent: "i".into(),
                owner: owner.into(),
                ..TaskContext::default()
            }),
            issuer,
            approval: None,
            usage: None,
        };
        assert!(
            engine
                .authorize(&request("https://partner", "assistant"))
                .allowed
        );
        assert!(
            !engine
                .authorize(&request("https://idp", "assistant"))
                .allowed
        );
        assert!(
            !engine
                .authorize(&request("https://partner", "other"))
                .allowed
        );
        // The example actions declare neither: their requests validate and decide as before.
        let mut plain = request("https://partner", "other");
        plain.action = "billing/get_invoice";
        plain.resource = Resource::Tool {
            upstream: "billing",
            tool: "get_invoice",
        };
        plain.args = json!({"invoice_id": 1}).as_object().unwrap().clone();
        let decision = engine.authorize(&plain);
        assert!(decision.errors.is_empty(), "{decision:?}");
    }

    #[test]
    fn erroring_forbid_denies() {
        // Passes strict validation; overflows (an evaluation error) for any positive amount.
        let dir = dir_with(&[(
            "overflow.cedar",
            "@id(\"overflowing-forbid\")\nforbid(principal, action == Toolgate::Action::\"billing/refund\", resource)\nwhen { context.args.amount + 9223372036854775807 < 0 };\n",
        )]);
        let engine = PolicyEngine::load(&dir.0).unwrap();
        let empty = Map::new();
        let req = AuthzRequest {
            agent: Principal {
                id: "assistant",
                claims: &empty,
            },
            user: Some(Principal {
                id: "alice",
                claims: &empty,
            }),
            action: "billing/refund",
            resource: Resource::Tool {
                upstream: "billing",
                tool: "refund",
            },
            args: json!({"invoice_id": 1, "amount": 10})
                .as_object()
                .unwrap()
                .clone(),
            env: Env {
                source_ip: "127.0.0.1".parse().unwrap(),
                time: Utc::now(),
            },
            task: None,
            issuer: "",
            approval: None,
            usage: None,
        };
        let d = engine.authorize(&req);
        assert!(!d.allowed, "an erroring forbid must deny: {d:?}");
        assert!(
            d.errors.iter().any(|e| e.contains("overflowing-forbid")),
            "{d:?}"
        );
        // Cedar alone would have allowed: the permit holds and the forbid was skipped.
        assert_eq!(d.policies, vec!["billing-refund"]);
    }
}

#[cfg(test)]
mod cache_tests {
    use crate::LoadCache;

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn cached_reloads_see_every_change() {
        let dir = std::env::temp_dir().join(format!("toolgate-cache-{}", std::process::id()));
        crate::testing::write_scale_dir(&dir, 20, 2, 4).unwrap();
        let mut cache = LoadCache::default();
        let first = PolicyEngine::load_cached(&dir, &mut cache).unwrap();
        assert_eq!(first.policy_count(), 40);
        assert_eq!(cache.cached_files(), 4);

        // A new valid file, then a broken one: the broken one is refused with file:line.
        write(
            &dir,
            "extra.cedar",
            "permit (principal, action == Toolgate::Action::\"up0/tool1\", resource);",
        );
        assert_eq!(
            PolicyEngine::load_cached(&dir, &mut cache)
                .unwrap()
                .policy_count(),
            41
        );
        write(&dir, "broken.cedar", "\npermit (principal, action == Toolgate::Action::\"up0/tool1\", resource)\nwhen { context.args.nope };");
        let err = PolicyEngine::load_cached(&dir, &mut cache)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("broken.cedar:3:"), "{err}");
        // The same verdict as a load without a cache.
        assert_eq!(
            PolicyEngine::load(&dir).err().unwrap().to_string(),
            err.to_string()
        );

        // Removing it heals the set; the cache forgets the file.
        std::fs::remove_file(dir.join("broken.cedar")).unwrap();
        assert_eq!(
            PolicyEngine::load_cached(&dir, &mut cache)
                .unwrap()
                .policy_count(),
            41
        );
        assert_eq!(cache.cached_files(), 5);

        // A schema change re-validates everything: dropping `name` breaks policies that use it.
        let schema = std::fs::read_to_string(dir.join("schema.cedarschema")).unwrap();
        write(
            &dir,
            "schema.cedarschema",
            &schema.replace(", name: String", ""),
        );
        let err = PolicyEngine::load_cached(&dir, &mut cache)
            .err()
            .expect("refused after schema change");
        assert!(err.to_string().contains("name"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
