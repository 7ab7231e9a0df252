// Package disks groups the appliance's block-device code: discover
// (which disks are data disks and what they hold), provision (GPT + LUKS2 on
// a blank disk), luks2 (the pure-Go LUKS2 formatter, parser and luks.go
// unlock) and fs (mkfs.ext4 and mount).
package disks
