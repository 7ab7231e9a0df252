package vm

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"sync"
	"time"
)

// QMP is a minimal synchronous client of QEMU's machine protocol.
type QMP struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
	id   int
}

type qmpReply struct {
	ID     *int            `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string `json:"event"`
	QMP   any    `json:"QMP"`
}

// DialQMP connects to a QMP unix socket, retrying until timeout while QEMU
// starts, and negotiates capabilities.
func DialQMP(path string, timeout time.Duration) (*QMP, error) {
	deadline := time.Now().Add(timeout)
	var conn net.Conn
	var err error
	for {
		conn, err = net.Dial("unix", path)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("connect QMP %s: %w", path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	q := &QMP{conn: conn, r: bufio.NewReaderSize(conn, 1<<16)}
	// Greeting.
	if _, err := q.readReply(nil); err != nil {
		conn.Close()
		return nil, fmt.Errorf("QMP greeting: %w", err)
	}
	if _, err := q.Execute("qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

func (q *QMP) readReply(id *int) (*qmpReply, error) {
	for {
		q.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("read QMP: %w", err)
		}
		var rep qmpReply
		if err := json.Unmarshal(line, &rep); err != nil {
			return nil, fmt.Errorf("decode QMP %q: %w", line, err)
		}
		if rep.Event != "" {
			continue
		}
		if id == nil {
			return &rep, nil
		}
		if rep.ID != nil && *rep.ID == *id {
			return &rep, nil
		}
	}
}

// Execute runs one QMP command and returns its result.
func (q *QMP) Execute(cmd string, args any) (json.RawMessage, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.id++
	id := q.id
	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	q.conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	rep, err := q.readReply(&id)
	if err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	if rep.Error != nil {
		return nil, fmt.Errorf("QMP %s: %s: %s", cmd, rep.Error.Class, rep.Error.Desc)
	}
	return rep.Return, nil
}

// Close closes the connection.
func (q *QMP) Close() error { return q.conn.Close() }
