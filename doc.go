// Package shellflip restarts a running service into a new process without
// dropping a connection.
package shellflip
