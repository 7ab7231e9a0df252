package ingest

import "time"

var zeroTime time.Time

// Rules is a static Authorizer: for each repository, the client names that
// may append to it and those that may only read it.
type Rules map[string]RepoRule

// RepoRule lists a repository's clients.
type RepoRule struct {
	Writers []string `json:"writers"`
	Readers []string `json:"readers"`
}

// Allowed implements Authorizer. Writers may also read.
func (r Rules) Allowed(client, repo string, write bool) bool {
	rule, ok := r[repo]
	if !ok {
		return false
	}
	for _, c := range rule.Writers {
		if c == client {
			return true
		}
	}
	if write {
		return false
	}
	for _, c := range rule.Readers {
		if c == client {
			return true
		}
	}
	return false
}
