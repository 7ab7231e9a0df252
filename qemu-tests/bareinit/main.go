// Command bareinit is the init of the baseline image for the boot-time
// benchmark: it prints one line and waits. Booting it under the same kernel,
// OVMF and TCG set-up as the appliance measures the cost of the platform
// alone.
package main

import (
	"fmt"
	"time"
)

// Line is what bareinit prints.
const Line = "bare init up"

func main() {
	fmt.Println(Line)
	for {
		time.Sleep(time.Hour)
	}
}
