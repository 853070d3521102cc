"""The release as a service of record (issue #8): the nightly smoke and the healthcheck."""
