//! The DynamoDB lock backend: the record-version lease of the AWS DynamoDB Lock Client.
//!
//! DynamoDB has no clock a condition can read, so no request can ask "has this lease
//! expired?". Instead every write of a held item (a grant, each heartbeat) stores a fresh
//! random record version number (RVN). A client that finds a key held notes the RVN and
//! when it first saw it, on its own monotonic clock, after the answer arrived; it may take
//! the key over only once it has seen that same RVN for the whole lease the holder
//! declared, and only with a write conditioned on that RVN. The argument is in the README.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableDescription, TableStatus,
    TimeToLiveStatus,
};
use aws_sdk_dynamodb::Client;
use lock_core::{
    AcquireRequest, Capabilities, FencedWrite, FencingToken, Grant, HolderMeta, LeaseId, LeaseKind,
    LeaseRef, LockBackend, LockError, LockInfo, LockKey, ReleaseOutcome, TokenGuarantee,
};
use tokio::time::Instant;

use crate::config::DynamoConfig;

pub(crate) const NAME: &str = "dynamo";

/// Attributes of a lock item (the partition key's name is configurable).
const OWNER: &str = "owner";
const RVN: &str = "rvn";
const LEASE_MS: &str = "lease_ms";
const TOKEN: &str = "token";
const META: &str = "meta";
/// Every attribute of a lock item but its key.
pub(crate) const ATTRIBUTES: [&str; 5] = [OWNER, RVN, LEASE_MS, TOKEN, META];

type Item = HashMap<String, AttributeValue>;

/// A lock store on one DynamoDB table. Cheap to clone; clones share the client and what it
/// has seen of held keys.
#[derive(Clone, Debug)]
pub struct DynamoBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    cfg: DynamoConfig,
    /// Per held key: the version this client saw, since when (after the answer arrived),
    /// and the lease its holder declared.
    seen: Mutex<HashMap<String, Seen>>,
    /// Per lease of this client: the versions the item may carry from its own writes (the
    /// last one applied, and any sent since whose answer never came). A heartbeat names
    /// them in its condition, so that a late one cannot land after a later write.
    mine: Mutex<HashMap<String, Vec<String>>>,
}

/// The most versions a condition names (DynamoDB allows 100 in `IN`).
const MAX_VERSIONS: usize = 32;

#[derive(Clone, Debug)]
struct Seen {
    rvn: String,
    since: Instant,
    lease: Duration,
}

fn rvn() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v),
        _ => None,
    }
}

fn n(item: &Item, name: &str) -> Option<u64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

/// Binds `values` as `:{prefix}0, :{prefix}1, ...` on `call`; returns the list for an `IN`.
fn in_list(
    prefix: &str,
    values: Vec<String>,
    mut call: UpdateItemFluentBuilder,
) -> (String, UpdateItemFluentBuilder) {
    let mut names = Vec::with_capacity(values.len());
    for (i, v) in values.into_iter().enumerate() {
        let name = format!(":{prefix}{i}");
        call = call.expression_attribute_values(&name, AttributeValue::S(v));
        names.push(name);
    }
    (names.join(", "), call)
}

fn num(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Maps a failed request: throttling and network faults are retryable, a missing table,
/// a key schema that does not fit and refused credentials are configuration errors.
fn map_err<E>(e: SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>) -> LockError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let text = DisplayErrorContext(&e).to_string();
    match &e {
        SdkError::ConstructionFailure(_) => {
            return LockError::InvalidConfig(format!("DynamoDB request not built: {text}"))
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            return LockError::backend(NAME, true, text)
        }
        _ => {}
    }
    match e.code().unwrap_or_default() {
        "ResourceNotFoundException" => LockError::InvalidConfig(format!(
            "the lock table does not exist (create it, or DynamoConfig::create_table): {text}"
        )),
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "MissingAuthenticationToken"
        | "MissingAuthenticationTokenException"
        | "ExpiredTokenException"
        | "IncompleteSignatureException" => {
            LockError::InvalidConfig(format!("DynamoDB refused access: {text}"))
        }
        "ValidationException" => {
            LockError::InvalidConfig(format!("DynamoDB rejected the request: {text}"))
        }
        "ProvisionedThroughputExceededException"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "InternalServerError"
        | "ServiceUnavailable"
        | "TransactionConflictException"
        | "LimitExceededException" => LockError::backend(NAME, true, text),
        // A server-side failure without a code we know is worth another try.
        _ => {
            let server = e
                .raw_response()
                .is_some_and(|r| r.status().is_server_error());
            LockError::backend(NAME, server, text)
        }
    }
}

/// A conditional write's answer.
enum Written {
    /// Applied; the item as asked back (`ReturnValues`), else empty.
    Applied(Item),
    /// Refused by its condition; the item that refused it, when asked for
    /// (`ReturnValuesOnConditionCheckFailure`).
    Refused(Option<Item>),
    /// No answer: the request failed, and may (`true`) or may not have been applied.
    Failed(LockError, bool),
}

async fn write(call: UpdateItemFluentBuilder) -> Written {
    match call.send().await {
        Ok(out) => Written::Applied(out.attributes.unwrap_or_default()),
        Err(e) => match e.as_service_error() {
            Some(UpdateItemError::ConditionalCheckFailedException(c)) => {
                Written::Refused(c.item().cloned())
            }
            _ => {
                // Not sent, or refused with a client error (throttled, invalid): not
                // applied. A timeout, a lost connection or a server error: unknown.
                let definite = match &e {
                    SdkError::ConstructionFailure(_) => true,
                    SdkError::ServiceError(_) => e
                        .raw_response()
                        .is_some_and(|r| r.status().is_client_error()),
                    _ => false,
                };
                Written::Failed(map_err(e), !definite)
            }
        },
    }
}

impl DynamoBackend {
    /// Connects with `cfg`: builds an SDK client from it (credentials and region from the
    /// environment unless given) and checks, or creates, the table.
    pub async fn connect_with(cfg: DynamoConfig) -> Result<Self, LockError> {
        cfg.validate()?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            // One request per call: lock-core retries, and knows which retries are safe.
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_timeout(cfg.op_timeout)
                    .build(),
            );
        if let Some(r) = &cfg.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(e) = &cfg.endpoint {
            loader = loader.endpoint_url(e);
        }
        if let Some((id, secret)) = &cfg.credentials {
            loader = loader.credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                id,
                secret,
                None,
                None,
                "lock-dynamo",
            ));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(LockError::InvalidConfig(
                "no AWS region: set DynamoConfig::region or AWS_REGION".into(),
            ));
        }
        Self::from_client(Client::new(&sdk), cfg).await
    }

    /// Builds the backend on the application's own client (its credentials, region,
    /// endpoint and retry settings); `cfg` gives the table and timeouts. Checks, or
    /// creates, the table. Retries the client makes on its own count against the
    /// operation timeout; a retried grant whose first try landed is recognised by its lease
    /// id.
    pub async fn from_client(client: Client, cfg: DynamoConfig) -> Result<Self, LockError> {
        cfg.validate()?;
        let me = Self {
            inner: Arc::new(Inner {
                client,
                cfg,
                seen: Mutex::new(HashMap::new()),
                mine: Mutex::new(HashMap::new()),
            }),
        };
        // On the heap: the SDK's request futures are large, and callers nest this one.
        Box::pin(me.check_table()).await?;
        Ok(me)
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The settings.
    pub fn config(&self) -> &DynamoConfig {
        &self.inner.cfg
    }

    fn bounded<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, LockError>>,
    ) -> impl std::future::Future<Output = Result<T, LockError>> {
        lock_core::backend::bounded(NAME, op, self.inner.cfg.op_timeout, f)
    }

    async fn describe(&self) -> Result<Option<TableDescription>, LockError> {
        self.bounded("describe table", async {
            let out = self
                .inner
                .client
                .describe_table()
                .table_name(&self.inner.cfg.table)
                .send()
                .await
                .map_err(map_err)?;
            Ok(out.table)
        })
        .await
    }

    /// The table must have exactly one key, a string partition key of the configured name.
    async fn check_table(&self) -> Result<(), LockError> {
        let cfg = &self.inner.cfg;
        let mut created = false;
        let table = loop {
            match self.describe().await {
                Ok(table) => break table,
                Err(LockError::InvalidConfig(m))
                    if m.starts_with("the lock table does not exist") =>
                {
                    if !cfg.create_table || created {
                        return Err(LockError::InvalidConfig(format!(
                            "table {:?} does not exist (create it with a string partition key \
                             {:?}, or set DynamoConfig::create_table)",
                            cfg.table, cfg.partition_key
                        )));
                    }
                    self.create_table().await?;
                    created = true;
                }
                Err(e) => return Err(e),
            }
        };
        let table = table.ok_or_else(|| {
            LockError::Protocol(format!(
                "DescribeTable of {:?} returned no table",
                cfg.table
            ))
        })?;
        if !table.replicas().is_empty() {
            return Err(LockError::InvalidConfig(format!(
                "table {:?} is a global table: its regions check conditions each on their own \
                 (the last write wins), so two regions could grant one key with one token; use \
                 a table in one region",
                cfg.table
            )));
        }
        let keys: Vec<(String, String)> = table
            .key_schema()
            .iter()
            .map(|k| {
                (
                    k.attribute_name().to_owned(),
                    k.key_type().as_str().to_owned(),
                )
            })
            .collect();
        let string_key = table.attribute_definitions().iter().any(|a| {
            a.attribute_name() == cfg.partition_key && *a.attribute_type() == ScalarAttributeType::S
        });
        if keys != [(cfg.partition_key.clone(), "HASH".to_owned())] || !string_key {
            return Err(LockError::InvalidConfig(format!(
                "table {:?} has the key schema {keys:?}; lock-dynamo needs exactly one key, a \
                 string partition key named {:?}",
                cfg.table, cfg.partition_key
            )));
        }
        self.check_ttl().await
    }

    /// Refuses a table that deletes items by a time-to-live on one of the lock item's
    /// attributes: a released item would go, and its token counter with it.
    async fn check_ttl(&self) -> Result<(), LockError> {
        let cfg = &self.inner.cfg;
        let ttl = self
            .bounded("describe time to live", async {
                let out = self
                    .inner
                    .client
                    .describe_time_to_live()
                    .table_name(&cfg.table)
                    .send()
                    .await
                    .map_err(map_err)?;
                Ok(out.time_to_live_description)
            })
            .await;
        let ttl = match ttl {
            Ok(ttl) => ttl,
            // A policy without the permission, or a store without the call: the table is
            // used, with a warning.
            Err(e) if !e.is_retryable() => {
                tracing::warn!(table = %cfg.table, error = %e, "cannot check the table's time to live (grant dynamodb:DescribeTimeToLive): a TTL on a lock attribute would restart token counters");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let on = ttl.as_ref().and_then(|d| {
            let status = d.time_to_live_status()?;
            // Items are still deleted while it is being turned off.
            let deleting = matches!(
                status,
                TimeToLiveStatus::Enabled
                    | TimeToLiveStatus::Enabling
                    | TimeToLiveStatus::Disabling
            );
            deleting.then(|| d.attribute_name()).flatten()
        });
        match on {
            Some(attr) if ATTRIBUTES.contains(&attr) || attr == cfg.partition_key => {
                Err(LockError::InvalidConfig(format!(
                    "table {:?} deletes items by time to live on {attr:?}, an attribute of the \
                     lock items: released items, and their token counters, would be deleted; \
                     turn it off or use another table",
                    cfg.table
                )))
            }
            _ => Ok(()),
        }
    }

    async fn create_table(&self) -> Result<(), LockError> {
        let cfg = &self.inner.cfg;
        let build =
            |e: aws_sdk_dynamodb::error::BuildError| LockError::InvalidConfig(e.to_string());
        let key = KeySchemaElement::builder()
            .attribute_name(&cfg.partition_key)
            .key_type(KeyType::Hash)
            .build()
            .map_err(build)?;
        let attr = AttributeDefinition::builder()
            .attribute_name(&cfg.partition_key)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(build)?;
        let created = self
            .bounded("create table", async {
                self.inner
                    .client
                    .create_table()
                    .table_name(&cfg.table)
                    .key_schema(key)
                    .attribute_definitions(attr)
                    .billing_mode(BillingMode::PayPerRequest)
                    .send()
                    .await
                    .map_err(map_err)
            })
            .await;
        match created {
            Ok(_) => {}
            // Another client created it meanwhile.
            Err(LockError::Backend { ref source, .. })
                if source.to_string().contains("ResourceInUseException") => {}
            Err(e) => return Err(e),
        }
        // A new table takes a moment to become usable.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let table = self.describe().await?;
            if table.and_then(|t| t.table_status) == Some(TableStatus::Active) {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(LockError::backend(
                    NAME,
                    true,
                    format!(
                        "table {:?} was not active 60 s after it was created",
                        cfg.table
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn update(&self, key: &str) -> UpdateItemFluentBuilder {
        let cfg = &self.inner.cfg;
        self.inner
            .client
            .update_item()
            .table_name(&cfg.table)
            .key(&cfg.partition_key, AttributeValue::S(key.to_owned()))
            .expression_attribute_names("#o", OWNER)
    }

    async fn get(&self, key: &str) -> Result<Option<Item>, LockError> {
        let cfg = &self.inner.cfg;
        self.bounded("get", async {
            let out = self
                .inner
                .client
                .get_item()
                .table_name(&cfg.table)
                .key(&cfg.partition_key, AttributeValue::S(key.to_owned()))
                .consistent_read(true)
                .send()
                .await
                .map_err(map_err)?;
            Ok(out.item)
        })
        .await
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.inner.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mine(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<String>>> {
        self.inner.mine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The versions the item may carry from this lease's own writes.
    fn versions(&self, lease: &LeaseId) -> Vec<String> {
        self.mine().get(lease.as_str()).cloned().unwrap_or_default()
    }

    /// A write of `version` for `lease` is about to go out: until its answer says
    /// otherwise, the item may carry it. Beyond the cap the oldest unanswered one goes
    /// (never the first, the one last known applied), which can only make a later
    /// condition fail.
    fn sending(&self, lease: &LeaseId, version: &str) {
        let mut mine = self.mine();
        let versions = mine.entry(lease.to_string()).or_default();
        versions.push(version.to_owned());
        if versions.len() > MAX_VERSIONS {
            versions.remove(1);
        }
    }

    /// The answer to a write of `version`: applied (the item now carries it and no
    /// earlier write of this lease can land any more), or certainly not applied.
    fn answered(&self, lease: &LeaseId, version: &str, applied: bool) {
        let mut mine = self.mine();
        if applied {
            mine.insert(lease.to_string(), vec![version.to_owned()]);
        } else if let Some(v) = mine.get_mut(lease.as_str()) {
            v.retain(|x| x != version);
        }
    }

    /// Whether `item` carries `version` under `lease`: a write refused on its condition was
    /// an identical resend (the SDK's own retry) of one already applied.
    fn carries(item: Option<&Item>, lease: &LeaseId, version: &str) -> bool {
        item.is_some_and(|i| s(i, OWNER) == Some(lease.as_str()) && s(i, RVN) == Some(version))
    }

    /// Notes the version of a held item, now (after the answer that carried it arrived):
    /// the same version keeps the time it was first seen. Returns what is noted.
    fn observe(&self, key: &str, item: &Item) -> Option<Seen> {
        let (Some(v), Some(lease)) = (s(item, RVN), n(item, LEASE_MS)) else {
            return None;
        };
        let mut seen = self.seen();
        if seen.len() > 1024 {
            // Keys this client no longer looks at.
            seen.retain(|_, s| s.since.elapsed() < s.lease * 2);
        }
        let entry = seen.entry(key.to_owned()).or_insert_with(|| Seen {
            rvn: v.to_owned(),
            since: Instant::now(),
            lease: Duration::from_millis(lease),
        });
        if entry.rvn != v {
            *entry = Seen {
                rvn: v.to_owned(),
                since: Instant::now(),
                lease: Duration::from_millis(lease),
            };
        }
        Some(entry.clone())
    }

    /// Refuses an item that is not a lock item of this crate (every one carries its token
    /// counter from its first grant on): another tool wrote it.
    fn check_lock_item(&self, key: &str, item: &Item) -> Result<(), LockError> {
        if n(item, TOKEN).is_some() {
            return Ok(());
        }
        Err(LockError::InvalidConfig(format!(
            "the item of {key:?} in table {:?} is not a lock item of lock-dynamo (no number \
             {TOKEN:?}): another tool wrote it (the AWS DynamoDB Lock Client?); give \
             lock-dynamo a table of its own. Nothing was written",
            self.inner.cfg.table
        )))
    }

    /// A version this client has seen unchanged for the whole lease its holder declared.
    fn expired_version(&self, key: &str) -> Option<String> {
        self.seen()
            .get(key)
            .filter(|s| s.since.elapsed() >= s.lease)
            .map(|s| s.rvn.clone())
    }

    /// Updates the one item of `table` whose key is `key` with the SET actions `set`
    /// (without the word SET; `names` and `values` for its placeholders), only if the
    /// token stored in the item's number attribute `field` is not higher than `token`; the
    /// item then carries `token` in `field`. An item without the field is an error (it
    /// cannot tell which holder wrote it: create fenced items with `field` at 0); a missing
    /// item is [`FencedWrite::NoMatch`]. One table must be written under the tokens of one
    /// lock key only.
    #[allow(clippy::too_many_arguments)]
    pub async fn fenced_update(
        &self,
        table: &str,
        key: Item,
        set: &str,
        names: HashMap<String, String>,
        values: Item,
        field: &str,
        token: FencingToken,
    ) -> Result<FencedWrite, LockError> {
        let bad = |m: String| Err(LockError::InvalidOptions(m));
        if key.is_empty() {
            return bad("the item's key is empty".into());
        }
        if set.trim().is_empty() {
            return bad("no SET actions given".into());
        }
        if field.is_empty() {
            return bad("the token attribute's name is empty".into());
        }
        if names.keys().any(|k| k == "#lock_fence") || values.keys().any(|k| k == ":lock_token") {
            return bad("#lock_fence and :lock_token are lock-dynamo's own placeholders".into());
        }
        let call = self
            .inner
            .client
            .update_item()
            .table_name(table)
            .set_key(Some(key))
            .update_expression(format!("SET {set}, #lock_fence = :lock_token"))
            .condition_expression("attribute_exists(#lock_fence) AND #lock_fence <= :lock_token")
            .set_expression_attribute_names(Some(names))
            .expression_attribute_names("#lock_fence", field)
            .set_expression_attribute_values(Some(values))
            .expression_attribute_values(":lock_token", num(token.get()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let old = match self
            .bounded("fenced update", async { Ok(write(call).await) })
            .await?
        {
            Written::Applied(_) => return Ok(FencedWrite::Applied(1)),
            Written::Refused(None) => return Ok(FencedWrite::NoMatch),
            Written::Refused(Some(old)) => old,
            Written::Failed(e, _) => return Err(e),
        };
        match n(&old, field) {
            Some(h) if h > token.get() => Ok(FencedWrite::Refused {
                highest: FencingToken::new(h),
            }),
            Some(_) => Ok(FencedWrite::NoMatch),
            None => Err(LockError::InvalidConfig(format!(
                "the item has no usable {field:?} (a whole number): a fenced item must carry \
                 one (0 when created); nothing was written"
            ))),
        }
    }
}

#[async_trait]
impl LockBackend for DynamoBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(LeaseKind::Ttl).tokens(TokenGuarantee::Durable)
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        let key = req.key.as_str();
        let sent = Instant::now();
        // Free (never held, or released), held under a version this client saw unchanged
        // for a whole lease, or holding a version of an earlier try of this lease whose
        // answer never came (it landed after all). A try can never land after a later
        // write of its lease: that write changed the version.
        let takeover = self.expired_version(key);
        let earlier = self.versions(&req.lease_id);
        let version = rvn();
        // Free means: no item, or a lock item (it carries its token counter) with no owner.
        // An item another tool wrote is never taken.
        let mut cond =
            "(attribute_not_exists(#o) AND (attribute_not_exists(#k) OR attribute_exists(#t)))"
                .to_owned();
        let mut call = self
            .update(key)
            .expression_attribute_names("#k", &self.inner.cfg.partition_key)
            .update_expression(
                "SET #o = :me, #v = :rvn, #l = :lease, #m = :meta, \
                 #t = if_not_exists(#t, :zero) + :one",
            )
            .expression_attribute_names("#v", RVN)
            .expression_attribute_names("#l", LEASE_MS)
            .expression_attribute_names("#m", META)
            .expression_attribute_names("#t", TOKEN)
            .expression_attribute_values(":me", AttributeValue::S(req.lease_id.to_string()))
            .expression_attribute_values(":rvn", AttributeValue::S(version.clone()))
            .expression_attribute_values(":lease", num(millis(req.ttl)))
            .expression_attribute_values(":meta", AttributeValue::S(req.meta.encode()))
            .expression_attribute_values(":zero", num(0))
            .expression_attribute_values(":one", num(1))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if let Some(v) = takeover {
            cond.push_str(" OR #v = :seen");
            call = call.expression_attribute_values(":seen", AttributeValue::S(v));
        }
        if !earlier.is_empty() {
            let (list, with) = in_list("m", earlier, call);
            cond.push_str(&format!(" OR (#o = :me AND #v IN ({list}))"));
            call = with;
        }
        self.sending(&req.lease_id, &version);
        let call = call.condition_expression(cond);
        let item = match self
            .bounded("acquire", async { Ok(write(call).await) })
            .await?
        {
            Written::Applied(item) => item,
            Written::Refused(Some(item)) if Self::carries(Some(&item), &req.lease_id, &version) => {
                item
            }
            Written::Refused(held) => {
                self.answered(&req.lease_id, &version, false);
                let held = match held {
                    Some(item) => Some(item),
                    None => self.get(key).await?,
                };
                if let Some(item) = &held {
                    self.check_lock_item(key, item)?;
                }
                if let Some(item) = held.filter(|i| s(i, OWNER).is_some()) {
                    self.observe(key, &item);
                }
                return Err(LockError::contended(key));
            }
            Written::Failed(e, maybe) => {
                if !maybe {
                    self.answered(&req.lease_id, &version, false);
                }
                return Err(e);
            }
        };
        self.answered(&req.lease_id, &version, true);
        self.seen().remove(key);
        let token = n(&item, TOKEN).filter(|t| *t > 0).ok_or_else(|| {
            LockError::Protocol(format!("the grant of {key:?} returned no token"))
        })?;
        Ok(Grant::ttl(FencingToken::new(token), sent + req.ttl))
    }

    /// Waits as the default does, and also waits out throttling and network faults (for up
    /// to twice the operation timeout in a row): polling writes are what DynamoDB throttles.
    /// A grant that landed unseen is granted again to the same lease id on the next try.
    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        lock_core::options::check_lease("lease", req.ttl)?;
        let started = Instant::now();
        let mut attempt = 0u32;
        let mut failing_since: Option<Instant> = None;
        let mut unsure = false;
        loop {
            let failure = match self.try_acquire(req).await {
                Err(LockError::Contended { .. }) => {
                    failing_since = None;
                    None
                }
                Err(e) if e.is_retryable() => {
                    unsure = true;
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    tracing::debug!(key = %req.key, error = %e, "acquire attempt failed");
                    (since.elapsed() >= self.inner.cfg.op_timeout * 2).then_some(e)
                }
                Err(e) => Some(e),
                Ok(g) => return Ok(g),
            };
            let now = Instant::now();
            let failure = failure.or_else(|| {
                deadline
                    .filter(|d| now >= *d)
                    .map(|_| LockError::timeout(&req.key, now - started))
            });
            if let Some(e) = failure {
                if unsure {
                    // Nothing left behind: not a grant whose answer was lost. (A try the
                    // network holds longer than that can still land: its lease is no
                    // one's, and a waiter takes the key over a lease later.)
                    let _ = self.release(&req.lease()).await;
                }
                return Err(e);
            }
            let mut pause = req.backoff.delay(attempt);
            if let Some(d) = deadline {
                pause = pause.min(d - now);
            }
            attempt = attempt.saturating_add(1);
            self.wait_for_change(&req.key, pause).await?;
        }
    }

    async fn wait_for_change(&self, key: &LockKey, max: Duration) -> Result<(), LockError> {
        // Look again by the time the version seen could be taken over, at the latest.
        let due = self
            .seen()
            .get(key.as_str())
            .map(|s| (s.since + s.lease).saturating_duration_since(Instant::now()));
        let pause = max
            .min(self.inner.cfg.poll_max)
            .min(due.unwrap_or(max).max(Duration::from_millis(1)));
        tokio::time::sleep(pause).await;
        Ok(())
    }

    async fn renew(&self, lease: &LeaseRef, ttl: Duration) -> Result<Instant, LockError> {
        lock_core::options::check_lease("lease", ttl)?;
        let sent = Instant::now();
        let id = &lease.lease_id;
        let known = self.versions(id);
        let version = rvn();
        let call = self
            .update(lease.key.as_str())
            .update_expression("SET #v = :rvn, #l = :lease")
            .expression_attribute_names("#v", RVN)
            .expression_attribute_names("#l", LEASE_MS)
            .expression_attribute_values(":me", AttributeValue::S(id.to_string()))
            .expression_attribute_values(":rvn", AttributeValue::S(version.clone()))
            .expression_attribute_values(":lease", num(millis(ttl)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        // Only over a version of this lease's own writes: a heartbeat (or a shorter
        // `extend`) that arrives late must not land after a later one.
        let call = if known.is_empty() {
            call.condition_expression("#o = :me")
        } else {
            let (list, call) = in_list("v", known, call);
            call.condition_expression(format!("#o = :me AND #v IN ({list})"))
        };
        // Noted before it goes out: a caller that gives up on the answer drops this call.
        self.sending(id, &version);
        match self
            .bounded("renew", async { Ok(write(call).await) })
            .await?
        {
            Written::Refused(item) if !Self::carries(item.as_ref(), id, &version) => {
                self.mine().remove(id.as_str());
                Err(LockError::NotHeld {
                    key: lease.key.to_string(),
                })
            }
            Written::Applied(_) | Written::Refused(_) => {
                self.answered(id, &version, true);
                Ok(sent + ttl)
            }
            Written::Failed(e, maybe) => {
                if !maybe {
                    self.answered(id, &version, false);
                }
                Err(e)
            }
        }
    }

    async fn release(&self, lease: &LeaseRef) -> Result<ReleaseOutcome, LockError> {
        // The item stays, with its token counter; a new version tells waiters it changed.
        let id = &lease.lease_id;
        let version = rvn();
        let call = self
            .update(lease.key.as_str())
            .update_expression("SET #v = :rvn REMOVE #o, #m")
            .condition_expression("#o = :me")
            .expression_attribute_names("#v", RVN)
            .expression_attribute_names("#m", META)
            .expression_attribute_values(":me", AttributeValue::S(id.to_string()))
            .expression_attribute_values(":rvn", AttributeValue::S(version.clone()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        self.sending(id, &version);
        let outcome = match self
            .bounded("release", async { Ok(write(call).await) })
            .await?
        {
            Written::Applied(_) => ReleaseOutcome::Released,
            Written::Refused(item) => {
                let item = match item {
                    Some(item) => Some(item),
                    None => self.get(lease.key.as_str()).await?,
                };
                // Free, and last written by a try of this release (an earlier one whose
                // answer was lost, or the SDK's resend): released by us after all.
                let mine = self.versions(id);
                let ours = item.is_some_and(|i| {
                    s(&i, OWNER).is_none()
                        && s(&i, RVN).is_some_and(|v| mine.iter().any(|m| m == v))
                });
                if ours {
                    ReleaseOutcome::Released
                } else {
                    ReleaseOutcome::NotHeld
                }
            }
            Written::Failed(e, maybe) => {
                if !maybe {
                    self.answered(id, &version, false);
                }
                return Err(e);
            }
        };
        self.mine().remove(id.as_str());
        Ok(outcome)
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>, LockError> {
        let Some(item) = self.get(key.as_str()).await? else {
            return Ok(None);
        };
        self.check_lock_item(key.as_str(), &item)?;
        let Some(owner) = s(&item, OWNER) else {
            return Ok(None);
        };
        let token = n(&item, TOKEN)
            .ok_or_else(|| LockError::Protocol(format!("the item of {key:?} has no token")))?;
        let meta = s(&item, META).map(HolderMeta::decode).unwrap_or_default();
        // By this client's watch of the version: DynamoDB keeps no expiry.
        let remaining = self
            .observe(key.as_str(), &item)
            .map(|s| (s.since + s.lease).saturating_duration_since(Instant::now()));
        Ok(Some(
            LockInfo::new(LeaseId::parse(owner)?, FencingToken::new(token), meta)
                .remaining(remaining),
        ))
    }
}
