//! The mesh token: the `authorization` value every call of this process to a manager carries.

/// The `authorization` value every call of this process to a manager carries (see
/// [`use_mesh_token`]).
static MESH_TOKEN: std::sync::RwLock<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>> =
    std::sync::RwLock::new(None);

/// Sets the mesh token this process's calls to the managers carry (the scheduler, workers and
/// standby managers each set the `--mesh-token` they were started with; `None`: no token). It is
/// one setting for the whole process, as the connections to the managers are.
pub fn use_mesh_token(token: Option<&str>) -> Result<(), String> {
    let value = token
        .map(|t| format!("Bearer {t}").parse().map_err(|_| "the mesh token must be printable ASCII".to_owned()))
        .transpose()?;
    *MESH_TOKEN.write().unwrap_or_else(|e| e.into_inner()) = value;
    Ok(())
}

/// `message` as a request to a manager, with the mesh token if the process has one.
pub fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = MESH_TOKEN.read().unwrap_or_else(|e| e.into_inner()).clone() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}
