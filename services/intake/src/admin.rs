//! The Admin gRPC service: orgs, API keys, object schemas and their versions. Needs the admin
//! token.

use baton_mesh::auth::require_admin;
use baton_mesh::proto::timestamp;
use baton_mesh::proto::v1 as pb;
use baton_store::{FieldError, Store};
use tonic::{Request, Response, Status};

use crate::{convert, require};
use baton_api::{Error, paging};
use baton_store::model::Cursor;

/// The Admin gRPC service.
#[derive(Debug, Clone)]
pub struct AdminService {
    store: Store,
}

impl AdminService {
    /// An admin service over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// The schema a DefineObject or UpdateObject request carries, for org `org_id`, checked.
fn schema_of(org_id: &str, schema: Option<pb::ObjectSchema>) -> Result<baton_store::model::ObjectSchema, Status> {
    require(org_id, "org_id")?;
    let Some(schema) = schema else {
        return Err(Error::Invalid(vec![FieldError::new("schema", "required")]).into());
    };
    Ok(convert::schema_from_pb(&schema).map_err(Error::Invalid)?)
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_org(&self, request: Request<pb::CreateOrgRequest>) -> Result<Response<pb::Org>, Status> {
        require_admin(&request)?;
        let org = self.store.create_org(&request.get_ref().name).await.map_err(Error::from)?;
        Ok(Response::new(pb::Org { id: org.id, name: org.name, create_time: timestamp(org.created_at_ms) }))
    }

    async fn list_orgs(&self, request: Request<pb::ListOrgsRequest>) -> Result<Response<pb::ListOrgsResponse>, Status> {
        require_admin(&request)?;
        let orgs = self.store.list_orgs().await.map_err(Error::from)?;
        Ok(Response::new(pb::ListOrgsResponse {
            orgs: orgs
                .into_iter()
                .map(|o| pb::Org { id: o.id, name: o.name, create_time: timestamp(o.created_at_ms) })
                .collect(),
        }))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        require_admin(&request)?;
        let request = request.into_inner();
        require(&request.org_id, "org_id")?;
        let key = self.store.create_api_key(&request.org_id, &request.label).await.map_err(Error::from)?;
        Ok(Response::new(pb::CreateApiKeyResponse { key_id: key.key_id, api_key: key.api_key, org_id: key.org_id }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        require_admin(&request)?;
        require(&request.get_ref().key_id, "key_id")?;
        self.store.revoke_api_key(&request.get_ref().key_id).await.map_err(Error::from)?;
        Ok(Response::new(pb::RevokeApiKeyResponse {}))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        require_admin(&request)?;
        let r = request.into_inner();
        let size = paging::page_size(r.page_size)?;
        let after = paging::cursor_of(&r.page_token)?;
        let org = (!r.org_id.is_empty()).then_some(r.org_id.as_str());
        let keys = self.store.list_api_keys(org, after.as_ref(), size + 1).await.map_err(Error::from)?;
        let (keys, next_page_token) =
            paging::page(keys, size, |k| Cursor { created_at_ms: k.created_at_ms, id: k.key_id.clone() });
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: keys
                .into_iter()
                .map(|k| pb::ApiKey {
                    key_id: k.key_id,
                    org_id: k.org_id,
                    label: k.label,
                    create_time: timestamp(k.created_at_ms),
                    revoke_time: k.revoked_at_ms.and_then(timestamp),
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn define_object(
        &self,
        request: Request<pb::DefineObjectRequest>,
    ) -> Result<Response<pb::ObjectSchema>, Status> {
        require_admin(&request)?;
        let request = request.into_inner();
        let schema = schema_of(&request.org_id, request.schema)?;
        let defined = self.store.define_object(&request.org_id, &schema).await.map_err(Error::from)?;
        Ok(Response::new(convert::schema_to_pb(&defined)))
    }

    async fn update_object(
        &self,
        request: Request<pb::UpdateObjectRequest>,
    ) -> Result<Response<pb::ObjectSchema>, Status> {
        require_admin(&request)?;
        let request = request.into_inner();
        let schema = schema_of(&request.org_id, request.schema)?;
        let updated = self.store.update_object(&request.org_id, &schema).await.map_err(Error::from)?;
        Ok(Response::new(convert::schema_to_pb(&updated)))
    }

    async fn list_object_versions(
        &self,
        request: Request<pb::ListObjectVersionsRequest>,
    ) -> Result<Response<pb::ListObjectVersionsResponse>, Status> {
        require_admin(&request)?;
        let request = request.into_inner();
        require(&request.org_id, "org_id")?;
        require(&request.object, "object")?;
        let versions = self.store.object_versions(&request.org_id, &request.object).await.map_err(Error::from)?;
        Ok(Response::new(pb::ListObjectVersionsResponse {
            versions: versions
                .iter()
                .map(|(schema, at_ms)| pb::ObjectVersion {
                    schema: Some(convert::schema_to_pb(schema)),
                    create_time: timestamp(*at_ms),
                })
                .collect(),
        }))
    }

    async fn list_objects(
        &self,
        request: Request<pb::ListObjectsRequest>,
    ) -> Result<Response<pb::ListObjectsResponse>, Status> {
        require_admin(&request)?;
        require(&request.get_ref().org_id, "org_id")?;
        let objects = self.store.list_objects(&request.get_ref().org_id).await.map_err(Error::from)?;
        Ok(Response::new(pb::ListObjectsResponse { objects: objects.iter().map(convert::schema_to_pb).collect() }))
    }
}
