//! One ACME certificate order (RFC 8555 section 7.4) with instant-acme: the account
//! (created once, kept in the certificate directory), the order, its challenge
//! published for every replica, finalization with a fresh P-256 key, the chain.

use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use portier_config::{Acme, AcmeChallenge};

use super::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the account file is unreadable: {0}")]
    Account(serde_json::Error),
    #[error("the authorization for {host} is {status:?}")]
    Authorization {
        host: String,
        status: AuthorizationStatus,
    },
    #[error("the directory offers no {0:?} challenge")]
    NoChallenge(ChallengeType),
    #[error("the order ended {0:?}")]
    Order(OrderStatus),
    #[error("the challenge certificate: {0}")]
    ChallengeCert(#[from] rcgen::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The account of `cfg` from the directory's `acme/account.json`, or a new one (terms
/// accepted, `email` as contact) saved there. The caller holds the account lock.
pub async fn account(cfg: &Acme, store: &Store) -> Result<Account, OrderError> {
    let builder = || match &cfg.ca {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    if let Some(bytes) = store.read_account() {
        let creds: AccountCredentials =
            serde_json::from_slice(&bytes).map_err(OrderError::Account)?;
        let saved_for = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["directory"].as_str().map(str::to_string));
        // An account belongs to one directory; another directory gets a new one.
        if saved_for.as_deref() == Some(cfg.directory.as_str()) {
            return Ok(builder()?.from_credentials(creds).await?);
        }
    }
    let contact = cfg.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = builder()?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await?;
    let json = serde_json::to_vec_pretty(&creds).map_err(OrderError::Account)?;
    store.write_account(&json)?;
    tracing::info!(directory = %cfg.directory, account = %account.id(), "acme: account created");
    Ok(account)
}

/// Orders a certificate for `host`; returns the chain and the key (PEM).
pub async fn obtain(
    account: &Account,
    host: &str,
    challenge: AcmeChallenge,
    store: &Store,
) -> Result<(String, String), OrderError> {
    let ids = [Identifier::Dns(host.to_string())];
    let mut order = account.new_order(&NewOrder::new(&ids)).await?;
    let kind = || match challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut token = None;
    let result = async {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                status => {
                    return Err(OrderError::Authorization {
                        host: host.to_string(),
                        status,
                    })
                }
            }
            let mut ch = authz
                .challenge(kind())
                .ok_or_else(|| OrderError::NoChallenge(kind()))?;
            let key_auth = ch.key_authorization();
            match challenge {
                AcmeChallenge::Http01 => {
                    store.put_http01(&ch.token, key_auth.as_str())?;
                    token = Some(ch.token.clone());
                }
                AcmeChallenge::TlsAlpn01 => {
                    let (cert, key) = alpn_certificate(host, key_auth.digest().as_ref())?;
                    store.put_alpn01(host, &cert, &key)?;
                }
            }
            ch.set_ready().await?;
        }
        let retry = RetryPolicy::new().timeout(Duration::from_secs(90));
        match order.poll_ready(&retry).await? {
            OrderStatus::Ready => {}
            other => return Err(OrderError::Order(other)),
        }
        let key = order.finalize().await?;
        let chain = order.poll_certificate(&retry).await?;
        Ok((chain, key))
    }
    .await;
    store.clear_challenge(host, token.as_deref());
    result
}

/// The self-signed TLS-ALPN-01 certificate for `host` carrying the key
/// authorization's digest in the critical acmeIdentifier extension (RFC 8737 3).
fn alpn_certificate(host: &str, digest: &[u8]) -> Result<(String, String), rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}
